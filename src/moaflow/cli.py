"""``moaflow <step>``: run one workflow step by hand. The options are generated from the step's function.

Every step of `moaflow.steps` is a sub-command; its options are the function's
keyword arguments (``--store``, ``--fold-names`` ...), their types from the
annotations and their help from the numpydoc docstring, so this module has no
option of its own to keep in step with the code but ``--threads``. Errors in
the input end with exit status 1 and one line naming the file, key or value at
fault; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing

from moaflow import steps
from moaflow.logs import USER_ERRORS, stderr


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({exc})") from None


def _boolean_or_text(text: str):
    return {"true": True, "false": False}.get(text.lower(), text)


def _option(annotation) -> tuple[dict, bool]:
    """argparse keywords for a parameter's annotation, and whether None is allowed."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if bool in members and str in members:
            return {"type": _boolean_or_text}, optional
        annotation = members[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}, optional
    if origin in (list, tuple) or annotation in (list, tuple):
        element = args[0] if args and args[0] is not Ellipsis else str
        if typing.get_origin(element) in (list, tuple, dict) or element in (list, tuple, dict):
            return {"type": _json, "metavar": "JSON"}, optional   # nested: one JSON value
        count = len(args) if origin is tuple and Ellipsis not in args else "+"
        return {"nargs": count, "type": element if element in (int, float) else str}, optional
    if annotation is dict or origin is dict:
        return {"type": _json, "metavar": "JSON"}, optional
    if annotation in (int, float):
        return {"type": annotation}, optional
    return {"type": str}, optional


def _help(function) -> dict[str, str]:
    from docstring_parser import parse

    texts = {}
    for param in parse(function.__doc__ or "").params:
        for name in param.arg_name.split(","):
            texts[name.strip()] = " ".join((param.description or "").split())
    return texts


def step_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one step, from its function's signature and docstring."""
    function = steps.load(name)
    doc = inspect.getdoc(function) or ""
    parser = argparse.ArgumentParser(prog=f"moaflow {name}", description=doc.split("\n\n")[0])
    hints = typing.get_type_hints(function)
    texts = _help(function)
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name == "log" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        keywords, optional = _option(hints.get(parameter.name, str))
        required = parameter.default is inspect.Parameter.empty
        if not required:
            keywords["default"] = parameter.default
        text = texts.get(parameter.name, "")
        if not required and parameter.default is not None:
            text += f" (default: {parameter.default})"
        parser.add_argument(f"--{parameter.name.replace('_', '-')}", dest=parameter.name, required=required,
                            help=text.strip() or None, **keywords)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="moaflow", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one step of the moaflow workflow by hand (`moaflow STEP --help` lists its options).",
        epilog="steps:\n" + "\n".join(f"  {n:<22}{steps.summary(n)}" for n in steps.STEPS))
    top.add_argument("--threads", type=int, default=1,
                     help="cores the step may use (BLAS, OpenCV and the Keras backends' thread pools)")
    top.add_argument("step", choices=list(steps.STEPS), metavar="STEP")
    position = next((i for i, a in enumerate(argv) if a in steps.STEPS), None)
    known = top.parse_args(argv if position is None else argv[: position + 1])
    steps.limit_threads(known.threads)
    arguments = vars(step_parser(known.step).parse_args(argv[position + 1:]))
    try:
        status = steps.call(steps.load(known.step), arguments, log=stderr)
    except USER_ERRORS as exc:
        print(f"moaflow {known.step}: error: {exc}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
