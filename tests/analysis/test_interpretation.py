import numpy as np

from moaflow.analysis import interpretation


def test_the_map_peaks_where_the_class_is_decided():
    """A model whose class is which quadrant is brightest: the occlusion map of a crop with one bright
    quadrant peaks in that quadrant."""
    import keras

    inputs = keras.Input((16, 16, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.AveragePooling2D(8)(x)                  # (2, 2, 3): mean of each quadrant
    x = keras.layers.Reshape((4, 3))(x)
    x = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")(x)   # sum of the channels
    x = keras.layers.Reshape((4,))(x)
    outputs = keras.layers.Activation("softmax")(keras.layers.Rescaling(0.5)(x))
    model = keras.Model(inputs, outputs)
    for quadrant in range(4):
        image = np.zeros((1, 16, 16, 3), np.uint8)
        r, c = divmod(quadrant, 2)
        image[0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 200
        assert model.predict(image, verbose=0).argmax() == quadrant
        heat = interpretation.occlusion_maps(model, image, np.array([quadrant]), grid=4)[0]
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert (peak[0] // 2, peak[1] // 2) == (r, c), (quadrant, heat)


def test_the_figure_names_the_channels_it_is_given(tmp_path, monkeypatch):
    """A crops dataset's channels are named from its config, not assumed to be BBBC021's."""
    titles = []
    monkeypatch.setattr(interpretation, "save_figure",
                        lambda fig, path, dpi: titles.extend(a.get_title() for a in fig.axes))
    images = np.zeros((2, 8, 8, 3), np.uint8)
    interpretation.plot_maps(images, np.zeros((2, 8, 8)), ["a", "b"], tmp_path / "f.png", "t",
                             ["red", "green", "blue"])
    assert titles[:3] == ["red", "green", "blue"] and "DAPI" not in titles
    titles.clear()
    interpretation.plot_maps(images, np.zeros((2, 8, 8)), ["a", "b"], tmp_path / "f.png", "t")
    assert titles[:3] == ["Actin", "Tubulin", "DAPI"]           # BBBC021's stored order by default
