"""Real datasets (ImageNet 64/256, LSUN bedroom, CelebA-HQ) read from a prepared TFDS `data_dir`.

Reading uses `tfds.data_source(name, split, data_dir=..., download=False)`: a
random-access ArrayRecord source that decodes with NumPy/Pillow, so TensorFlow
is neither needed nor imported at run time. Preparing the data (once, on a
machine with TensorFlow) is done with the `tfds` command line, for example

    pip install tensorflow tensorflow-datasets
    tfds build imagenet_resized/64x64 --data_dir=DIR --file_format=array_record

(`--file_format=array_record` matters: the default TFRecord format is not
random-access.) Datasets that need a manual download say so in their error.

Every check (data_dir exists, dataset prepared, ArrayRecord format, split
present) runs when the source is built, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

from asyncpatch_jax.runtime import checks


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How one project dataset maps onto a TFDS dataset."""

  tfds_name: str
  image_size: int  # default output side; images are centre-cropped and resized to it
  label_key: str | None  # None: unconditional
  num_classes: int | None
  splits: dict  # project split ('train' / 'test') -> TFDS split
  manual: str = ""  # manual-download instructions ('' if TFDS downloads it)


_IMAGENET_MANUAL = (
    "imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar (from image-net.org) in DIR/downloads/manual/ first. ")
_CELEBA_HQ_MANUAL = (
    "celeb_a_hq needs a manual download: follow the instructions of the TFDS "
    "celeb_a_hq catalogue page and put the files in DIR/downloads/manual/ first. ")

DATASETS: dict[str, TfdsSpec] = {
    "imagenet64": TfdsSpec("imagenet_resized/64x64", 64, "label", 1000,
                           {"train": "train", "test": "validation"}),
    "imagenet256": TfdsSpec("imagenet2012", 256, "label", 1000,
                            {"train": "train", "test": "validation"}, _IMAGENET_MANUAL),
    "lsun_bedroom": TfdsSpec("lsun/bedroom", 256, None, None,
                             {"train": "train", "test": "validation"}),
    # CelebA-HQ has a single 'train' split (30000 images); hold out its last 3000.
    "celeba_hq": TfdsSpec("celeb_a_hq/256", 256, None, None,
                          {"train": "train[:27000]", "test": "train[27000:]"}, _CELEBA_HQ_MANUAL),
}


def prepare_command(spec: TfdsSpec, data_dir: str = "DIR") -> str:
  """The shell command that prepares `spec` in `data_dir` (run where TensorFlow is installed)."""
  manual = f" --manual_dir={data_dir}/downloads/manual" if spec.manual else ""
  return (f"pip install tensorflow tensorflow-datasets && tfds build {spec.tfds_name} "
          f"--data_dir={data_dir} --file_format=array_record{manual}")


def _how_to_prepare(spec: TfdsSpec, data_dir) -> str:
  d = str(data_dir) if data_dir else "DIR"
  # One line: the command line prints an InputError as a single line.
  return (f"To prepare it: {spec.manual.replace('DIR', d)}on a machine with TensorFlow run "
          f"`{prepare_command(spec, d)}`, "
          f"then pass data_dir={d} (the folder that contains '{spec.tfds_name.split('/')[0]}/').")


def _base_split(split: str) -> str:
  """'train[:10%]' -> 'train'."""
  return re.split(r"[\[+]", split, maxsplit=1)[0].strip()


def check_prepared(name: str, split: str, data_dir) -> tuple[TfdsSpec, str]:
  """Checks that dataset `name` is prepared for random access in `data_dir`.

  Returns (spec, tfds split string). Raises ValueError naming what is missing
  and how to prepare it (data_dir unset or missing, dataset not built, built
  as TFRecord instead of ArrayRecord, split absent).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runtime import storage  # pylint: disable=g-import-not-at-top

  if name not in DATASETS:
    raise checks.InputError(f"Unknown TFDS-backed dataset {name!r}; known: {sorted(DATASETS)}.")
  spec = DATASETS[name]
  tfds_split = spec.splits.get(split, split)
  base_split = _base_split(tfds_split)
  if split not in spec.splits and base_split not in {_base_split(v) for v in spec.splits.values()}:
    raise checks.InputError(f"Unknown split {split!r} for {name}; expected one of "
                     f"{sorted(spec.splits)} (or a TFDS split string such as "
                     f"'{_base_split(next(iter(spec.splits.values())))}[:10%]').")
  if not data_dir:
    raise checks.InputError(f"Dataset {name!r} ({spec.tfds_name}) is read from a prepared TFDS "
                     f"data_dir, but data_dir is not set. " + _how_to_prepare(spec, None))
  # storage.path: a gs:// data_dir without gcsfs names the extra to install.
  if not storage.path(data_dir, "data_dir").is_dir():
    raise checks.InputError(f"data_dir {str(data_dir)!r} for dataset {name!r} does not exist. "
                     + _how_to_prepare(spec, data_dir))
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise checks.InputError(f"Dataset {spec.tfds_name} (version {builder.version}) is not prepared "
                     f"in data_dir {str(data_dir)!r}: {builder.data_dir} has no complete "
                     f"dataset. " + _how_to_prepare(spec, data_dir))
  fmt = builder.info.file_format
  if fmt is None or fmt.value not in ("array_record", "parquet"):
    raise checks.InputError(
        f"Dataset {spec.tfds_name} in {builder.data_dir} is stored as "
        f"{getattr(fmt, 'value', fmt)}, which is not random-access. Rebuild it with "
        f"--file_format=array_record, or convert it with: tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record")
  if base_split not in builder.info.splits:
    raise checks.InputError(f"Split {base_split!r} of {spec.tfds_name} is not prepared in "
                     f"{builder.data_dir}; prepared splits: {sorted(builder.info.splits)}.")
  return spec, tfds_split


def to_float_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [h, w, C] -> float32 [size, size, 3] in [-1, 1].

  Centre crop to a square and resize with Pillow as in ADM's `center_crop_arr`
  (Dhariwal and Nichol): box-filter halvings while the short side is >= 2 size,
  then bicubic to short side = size, then the centre crop. Images already
  size x size are only rescaled (bit-exact `x / 127.5 - 1`).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.dtype != np.uint8:
    raise checks.InputError(f"expected a uint8 image, got {image.dtype}")
  h, w, _ = image.shape
  if (h, w) != (size, size):
    pil = Image.fromarray(image)
    while min(pil.size) >= 2 * size:
      pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    image = arr[top:top + size, left:left + size]
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class TfdsSource:
  """Random-access source over a prepared TFDS dataset (grain `RandomAccessDataSource`).

  Each example is `dict(image=[S, S, 3] float32 in [-1, 1])` plus
  `label=int32 ()` for labelled datasets (ImageNet).
  """

  def __init__(self, name: str, split: str = "train", data_dir=None, image_size: int | None = None):
    spec, tfds_split = check_prepared(name, split, data_dir)
    if image_size is None:
      image_size = spec.image_size
    if not isinstance(image_size, (int, np.integer)) or not 8 <= image_size <= spec.image_size:
      raise checks.InputError(f"{name}: image_size must be an int in [8, {spec.image_size}] "
                       f"(images are only downsampled), got {image_size!r}.")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.name = name
    self.split = split
    self.data_dir = str(data_dir)
    self.spec = spec
    self.tfds_split = tfds_split
    self.image_size = int(image_size)
    self.image_shape = (self.image_size, self.image_size, 3)
    self.num_classes = spec.num_classes
    self._ds = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir,
                                download=False)

  def __len__(self) -> int:
    return len(self._ds)

  def _convert(self, record: dict) -> dict[str, np.ndarray]:
    out = {"image": to_float_image(record["image"], self.image_size)}
    if self.spec.label_key is not None:
      out["label"] = np.int32(record[self.spec.label_key])
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self._convert(self._ds[int(index)])

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    # ArrayRecord reads a list of records in parallel.
    return [self._convert(r) for r in self._ds.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_size={self.image_size})")


def write_prepared_dataset(name: str, data_dir, examples: dict[str, list[dict]]) -> str:
  """Writes a small *prepared* TFDS dataset for `name` into `data_dir`, without TensorFlow.

  For tests and smoke runs on machines without the real data: the result is
  what `tfds build ... --file_format=array_record` leaves behind (metadata
  plus one ArrayRecord shard per split), readable by `TfdsSource`.

  Args:
    name: a key of `DATASETS`.
    data_dir: target TFDS data directory.
    examples: TFDS split name -> list of examples in the dataset's TFDS
      features (uint8 images [h, w, 3]; labels as ints; other features of
      the TFDS dataset must be given too, e.g. `id` for lsun).
  Returns:
    the dataset version directory.
  """
  import io  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  spec = DATASETS[name]
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
  out_dir = str(builder.data_dir)
  os.makedirs(out_dir, exist_ok=True)
  ds_name = spec.tfds_name.split("/")[0]
  image_feature = builder.info.features["image"]
  fmt = getattr(image_feature, "encoding_format", None) or "png"

  def encode(ex):
    # TFDS encodes images with TensorFlow; hand it already-encoded bytes instead.
    ex = dict(ex)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(ex["image"], np.uint8)).save(buf, format=fmt.upper())
    buf.seek(0)
    ex["image"] = buf
    return builder.info.features.serialize_example(ex)

  split_infos = []
  for split, exs in examples.items():
    template = tfds.core.ShardedFileTemplate(
        data_dir=out_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=ds_name, split=split, filetype_suffix="array_record")
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    for ex in exs:
      writer.write(encode(ex))
    writer.close()
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(exs)], num_bytes=0,
                                           filename_template=template))
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(out_dir)
  return out_dir
