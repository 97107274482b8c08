import numpy as np

from moaflow import interpretation


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
