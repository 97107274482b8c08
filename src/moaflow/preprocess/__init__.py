"""From 16-bit fields to training-ready 8-bit crops: illumination functions (`illumination`), the
intensity normalisations (`intensity`, the registry of ``preprocess.<dataset>.normalisation``), grid crops
and resizing (`crops`), the per-plate and per-dataset passes (`plates`) and the memory-mappable crop
store (`store`)."""
