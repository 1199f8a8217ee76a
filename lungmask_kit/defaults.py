"""Every default of the pipeline, in one place."""

# Image discovery
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + DICOM_EXTENSIONS
# Inputs (image and mask files) larger than this are error rows, never read whole into memory.
MAX_FILE_BYTES = 1 << 30
# Refuse images whose declared size exceeds this many pixels (decompression bombs).
MAX_IMAGE_PIXELS = 20000 * 20000

# Post-processing (fractions of the image area, applied at model resolution)
THRESHOLD = 0.5
MIN_OBJECT_FRACTION = 0.005  # components under 0.5% of the image are noise (a lung is ~10-25%)
MAX_HOLE_FRACTION = 0.005  # holes under 0.5% of the image inside a lung are filled
KEEP_LARGEST = 2  # keep the two lungs; 0 disables

# QC: the study's slides say 15%; the authors' code cut at 1/15 (6.7%).
MIN_LUNG_FRACTION = 0.15

# Annotation convention of the masks (choices.Convention): the bundled model has an output for each
CONVENTION = "v7"

# Inference
BATCH_SIZE = 16
# Decoded images held between decoding and writing (MiB): about 90 images of 2000x2000 8-bit, or 7 of
# 12000x12000; the queue is bounded by bytes, whatever --workers and --batch-size are.
MAX_DECODED_MB = 1024
INPUT_SIZE = 256

# Model architecture of the default segmenter (method: FPN + DenseNet121, grayscale input).
SEGMENTER = {
    "arch": "FPN",
    "encoder": "densenet121",
    "in_channels": 1,
    "classes": 1,
    "input_size": INPUT_SIZE,
}

# ImageNet statistics, for models whose config asks for them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Training
TRAIN = {
    "epochs": 36,
    "batch_size": 8,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "warmup_epochs": 1,
    "val_fraction": 0.2,
    "seed": 0,
}

RUN_FILE = ".lungkit-run.json"  # marks a segment or variants output folder
# files that mark a folder lungkit wrote (a run, a report, a dataset, a calibrated model, a classify audit):
# such a folder inside an input folder is never read as input
OUTPUT_MARKERS = (RUN_FILE, ".lungkit-report", ".lungkit-dataset", ".lungkit-model", ".lungkit-classify")
