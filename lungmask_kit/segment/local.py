"""The segment units on the local engine (`engines.local.run_local`: decode threads, model batches, writer threads
on one machine), with the nvJPEG path that decodes a batch's gray JPEGs on the GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lungmask_kit.accel import decode_jpegs
from lungmask_kit.engines.local import ByteBudget, Item
from lungmask_kit.imaging import DecodedImage, ImageDecodeError, decode_image
from lungmask_kit.segment.steps import DeviceJpeg, ImagePrediction, ImageReader, OutputWriter, Task

if TYPE_CHECKING:
    from lungmask_kit.inference import Segmenter

class LocalSteps:
    """The segment units for `engines.local.run_local`: the reader and the writer, the loaded model, and the byte
    budget that bounds the decoded images held between them."""

    def __init__(self, reader: ImageReader, writer: OutputWriter, segmenter: Segmenter, budget: ByteBudget, pad_to: int,
                 tta: bool):
        self.reader, self.writer, self.segmenter, self.budget = reader, writer, segmenter, budget
        self.pad_to, self.tta = pad_to, tta
        self.asynchronous = segmenter.device.type == "cuda"

    def read(self, task: Task) -> Item:
        item = self.reader.read(task)
        self.budget.take(item.held)  # given back by write(), whatever happens there
        return item

    def predict(self, items: list[Item]) -> Callable[[], None]:
        self._decode_jpegs_on_device([it for it in items if isinstance(it.model_input, DeviceJpeg)])
        items = [it for it in items if it.model_input is not None]
        if not items:
            return lambda: None
        wait = self.segmenter.start([it.model_input for it in items], pad_to=self.pad_to, tta=self.tta)

        def finish() -> None:
            pred = wait()
            for i, it in enumerate(items):
                it.model_input = None  # spent: free it; the prediction sends the image to the writers
                it.prediction = ImagePrediction(pred.probabilities[i], pred.pooled[i],
                                                None if pred.flipped is None else pred.flipped[i],
                                                {name: p[i] for name, p in pred.extra.items()})

        return finish

    def _decode_jpegs_on_device(self, items: list[Item]) -> None:
        """nvJPEG for the batch's gray JPEGs; one it does not decode is decoded on the host (or fails there)."""
        if not items:
            return
        for it, tensor in zip(items, decode_jpegs([it.model_input.data for it in items], self.segmenter.device)):
            data, it.model_input = it.model_input.data, None
            self.budget.give_back(it.held)  # the estimate; accept() measures the decoded image
            it.held = 0
            try:
                decoded = DecodedImage(tensor.cpu().numpy(), 1) if tensor is not None else decode_image(data)
            except ImageDecodeError as err:
                it.row["error"] = str(err)
                continue
            self.reader.accept(it, decoded)
            self.budget.take(it.held)
            if tensor is not None:
                it.model_input = tensor  # already on the device

    def write(self, item: Item) -> dict:
        try:
            return self.writer.write(item.task, item.row, item.pixels, item.prediction)
        finally:
            self.budget.give_back(item.held)
            item.pixels = item.prediction = None

    def failed(self, item: Item, err: Exception) -> dict:
        return self.writer.failed(item.row, err)
