"""The face-crop geometry of a model family: how a background frame becomes the model's input, and back.

Both services need it: the compositing service crops and pastes back, the inference service builds the masked
half of the model input from the real crop it was sent (or holds). SyncTalk_2D has two families: the 328 models
(a 328 crop, the inner 320 fed to the model, bicubic both ways, as its inference script runs them) and the 160
models (a 168 crop, inner 160, bilinear both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

INTERPOLATIONS = ("cubic", "linear")


@dataclass(frozen=True)
class Geometry:
    name: str
    crop_size: int  # the face rectangle is resized to crop_size x crop_size ...
    inner: int  # ... and [inner:inner + input_size] of it is the model's input
    input_size: int
    mask: tuple[int, int, int, int]  # cv2.rectangle (x, y, w, h), filled with 0 in the masked copy
    crop_interpolation: str = "cubic"  # rectangle -> crop
    paste_interpolation: str = "cubic"  # crop -> rectangle

    @property
    def inner_slice(self) -> slice:
        return slice(self.inner, self.inner + self.input_size)

    @property
    def mask_rows(self) -> slice:
        _, y, _, h = self.mask
        return slice(y, y + h)

    @property
    def mask_cols(self) -> slice:
        x, _, w, _ = self.mask
        return slice(x, x + w)

    @property
    def visual_shape(self) -> tuple[int, int, int]:
        """The model's image input per frame: the real crop and its masked copy."""
        return (6, self.input_size, self.input_size)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """The real crop alone, channels first: what travels (and is cached) when the server builds the mask."""
        return (3, self.input_size, self.input_size)

    def check(self) -> None:
        if self.crop_size < self.inner + self.input_size:
            raise ValueError(f"crop_size {self.crop_size} is smaller than inner {self.inner} + input {self.input_size}")
        x, y, w, h = self.mask
        if min(x, y) < 0 or w <= 0 or h <= 0 or x + w > self.input_size or y + h > self.input_size:
            raise ValueError(
                f"mask {list(self.mask)} does not lie inside the {self.input_size}x{self.input_size} input"
            )
        for which in (self.crop_interpolation, self.paste_interpolation):
            if which not in INTERPOLATIONS:
                raise ValueError(f"interpolation {which!r}: expected one of {', '.join(INTERPOLATIONS)}")


GEOMETRIES = {
    "328": Geometry("328", 328, 4, 320, (5, 5, 310, 305), "cubic", "cubic"),
    "160": Geometry("160", 168, 4, 160, (5, 5, 150, 145), "linear", "linear"),
}
DEFAULT = GEOMETRIES["328"]


def geometry_for_input(size: int) -> Geometry:
    """The family whose model input is ``size`` pixels square (how an inference server that was told nothing
    finds the mask of a model from its input shape)."""
    for geometry in GEOMETRIES.values():
        if geometry.input_size == size:
            return geometry
    raise ValueError(f"no known geometry has a {size}x{size} model input (known: 320, 160)")
