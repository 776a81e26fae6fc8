"""The task registry: one TaskSpec per task drives training, evaluation and the app's pages."""
from __future__ import annotations

from dataclasses import dataclass, field

from core import constants as K  # the input constants only: no torch at import


@dataclass(frozen=True)
class TaskSpec:
    """Everything the code needs to know about one diagnostic task."""

    name: str
    title: str
    kind: str  # "binary" or "segmentation"
    classes: tuple[str, ...]
    architecture: str
    model_kwargs: dict
    input_spec: dict
    accepted_inputs: tuple[str, ...]
    monitor: str  # validation metric that picks the best checkpoint
    dataset: str
    default_threshold: float = 0.5
    train_defaults: dict = field(default_factory=dict)
    # inference may use bfloat16 where the hardware runs it natively ("auto" precision): only where it
    # pays and the outputs hold (python -m core.bench --accuracy); the X-ray CNN gains nothing from it
    bf16_inference: bool = False
    # inference may run 8-bit integer passes where the weights carry activation ranges observed on their
    # training volumes (core.quantize) and "auto" precision picks them (core.precision.inference_precision)
    int8_inference: bool = False
    # train_all's wall-clock budget on 2 CPU cores: (minutes, share kept for what is not epochs: reading the
    # data, scoring, checks, calibration, as measured on the slower of the CPUs seen); on a machine where the
    # schedule would overrun it, core.train.fit shortens the schedule (never under half) and the card says so
    train_budget: tuple[float, float] | None = None
    intended_use: str = ""  # the population and input the model was trained and validated for, in words

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "segmentation"):
            raise ValueError(f"kind must be 'binary' or 'segmentation', got {self.kind!r}")

    @property
    def weights_file(self) -> str:
        return f"{self.name}.pt"

    @property
    def card_file(self) -> str:
        return f"{self.name}.json"


TASKS: dict[str, TaskSpec] = {
    "pneumonia": TaskSpec(
        name="pneumonia",
        title="Pneumonia (chest X-ray)",
        kind="binary",
        classes=("normal", "pneumonia"),
        architecture="SmallCNN",
        model_kwargs={"in_channels": 1, "base": 16, "n_blocks": 4, "dropout": 0.3},
        input_spec={"size": K.XRAY_SIZE, "channels": 1, "resize": "stretch to square (as the Kermany copy)",
                    "equalize": True,
                    "intensity": "0.5-99.5 percentile min-max, resize, histogram equalisation, then (x-0.5)/0.25"},
        accepted_inputs=("png", "jpeg", "dicom"),
        monitor="shift_auc",
        dataset="Kermany et al. 2018 chest X-rays, official training split (chest_xray/train)",
        train_defaults={"epochs": 20, "batch_size": 64, "lr": 1e-3, "patience": 20, "ema": 0.99},
        train_budget=(30, 0.4),  # population check + calibration after the epochs: 8.6-10.4 min of 23-26
        intended_use="frontal (PA/AP) chest radiographs of young children (about 1-5 years), as in the Guangzhou "
                     "paediatric cohort; adult, lateral and other images are withheld by a population check",
    ),
    "cardiac": TaskSpec(
        name="cardiac",
        title="Cardiac disease (cine MRI)",
        kind="binary",
        classes=("normal", "disease"),
        architecture="CardiacNet",
        model_kwargs={"in_channels": 2 * K.CARDIAC_SLICES, "base": 16, "depth": 4, "n_seg_classes": 4,
                      "dropout": 0.3},
        input_spec={"size": K.CARDIAC_SIZE, "slices_per_frame": K.CARDIAC_SLICES,
                    "slice_range": list(K.CARDIAC_SLICE_RANGE), "crop_fraction": K.CARDIAC_CROP_FRACTION,
                    "crop_centre": "heart", "frames": ["ED", "ES"], "intensity": "1-99 percentile min-max per frame, then (x-0.5)/0.25"},
        accepted_inputs=("nifti",),
        monitor="auc",
        dataset="ACDC (Bernard et al. 2018), ED and ES frames (ACDC/)",
        train_defaults={"epochs": 20, "batch_size": 16, "lr": 1e-3, "patience": 20},
        train_budget=(30, 0.15),  # 5 folds: heads, out-of-fold scoring, diagnosis model: 3.3 min of 34.8
        bf16_inference=True,
        intended_use="short-axis cine MRI (bSSFP) of adults, ED and ES frames or a 4D cine, as in ACDC (Dijon); "
                     "other centres, field strengths and children untested",
    ),
    "atrium": TaskSpec(
        name="atrium",
        title="Left-atrium segmentation (3D MRI)",
        kind="segmentation",
        classes=("background", "left atrium"),
        architecture="UNet2D",
        model_kwargs={"in_channels": 2 * K.ATRIUM_CONTEXT + 1, "out_channels": 1, "base": 16, "depth": 4},
        input_spec={"spacing_mm": K.ATRIUM_SPACING_MM, "context_slices": K.ATRIUM_CONTEXT,
                    "pad_multiple": K.UNET_MULTIPLE, "intensity": "0.5-99.5 percentile clip, z-score per volume",
                    "postprocess": "largest 3D connected component"},
        accepted_inputs=("nifti",),
        monitor="dice",
        dataset="MSD Task02_Heart bSSFP (Task02_Heart/) + 2018 LA challenge LGE-MRI (LA2018/)",
        train_defaults={"epochs": 64, "batch_size": 32, "lr": 2e-3, "patience": 48, "crop": 128,
                        "samples_per_epoch": 4000},
        train_budget=(90, 0.08),  # reading 96 volumes, scoring them, the quality check: 3 min of 88.2
        bf16_inference=True,
        int8_inference=True,
        intended_use="3D cardiac MRI of adults, bSSFP (as MSD, King's College London) or LGE (as the 2018 Utah "
                     "challenge), any slice plane; other sequences and centres untested",
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
