"""Paths under a workdir or a data_dir: a local folder or a `gs://` URL, always through etils.epath.

Every file the library reads or writes under a workdir, a data_dir or a sample output
folder goes through `path()` (checkpoint arrays go through orbax/tensorstore, dataset
records through tfds/array_record, which take the same URLs). For `gs://`, epath uses
fsspec's `gcsfs` (installed by the `[tpu]` extra); TensorFlow is never used, even where
it is installed (`EPATH_USE_TF=false` unless the user set it).

The checks here run before anything compiles and turn a wrong path into one
`checks.InputError`: a URL scheme other than gs://, gs:// without gcsfs installed, a
bucket that does not exist, a workdir that cannot be written.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

from asyncpatch_jax import checks

# With TensorFlow installed, epath would route gs:// through tf.io.gfile (importing TF).
os.environ.setdefault("EPATH_USE_TF", "false")

INSTALL_GCS = "pip install -e '.[tpu]' (or pip install gcsfs)"


class WriteError(RuntimeError):
  """A file under a workdir could not be written (disk full, permissions, a lost bucket).

  The command line prints it as one line; the message names the file, the reason and
  what was kept.
  """


def is_url(p) -> bool:
  """True for `scheme://...` paths (gs://bucket/run), False for local paths."""
  return "://" in os.fspath(p)


def path(p, what: str = "workdir") -> epath.Path:
  """`p` as an epath.Path: a gs:// URL as it is, a local path made absolute.

  Raises InputError for a URL scheme other than gs:// and for gs:// without gcsfs.
  Touches no file and no network.
  """
  text = os.fspath(p)
  if not is_url(text):
    return epath.Path(text).expanduser().resolve()
  scheme = text.split("://", 1)[0]
  if scheme != "gs":
    raise checks.InputError(f"{what} {text!r}: only local paths and gs:// URLs are supported "
                            f"(got a {scheme}:// URL).")
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise checks.InputError(f"{what} {text!r} is a gs:// URL, which needs gcsfs; install the "
                            f"GCS extra: {INSTALL_GCS}.") from None
  return epath.Path(text)


def bucket_of(p) -> str | None:
  """'bucket' for gs://bucket/a/b, None for a local path."""
  text = os.fspath(p)
  return text.split("://", 1)[1].split("/", 1)[0] if is_url(text) else None


def check_bucket(p, what: str = "workdir") -> epath.Path:
  """path(p); for a gs:// URL also checks that its bucket exists (InputError if not)."""
  out = path(p, what)
  bucket = bucket_of(out)
  if bucket is not None:
    try:
      found = epath.Path(f"gs://{bucket}").exists()
    except _errors(out) as e:      # 401/403 on the bucket itself: no access at all
      raise checks.InputError(f"{what} {os.fspath(p)!r}: bucket gs://{bucket} cannot be read "
                              f"({_reason(e)}).") from None
    if not found:
      raise checks.InputError(f"{what} {os.fspath(p)!r}: bucket gs://{bucket} does not exist; "
                              f"create it (gcloud storage buckets create gs://{bucket}) or fix "
                              "the URL.")
  return out


def check_writable(p, what: str = "workdir") -> epath.Path:
  """check_bucket(p), then creates the folder and writes and removes a probe file in it.

  Raises InputError (naming the folder and the reason) if any of it fails.
  """
  out = check_bucket(p, what)
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write_test_{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
  except _errors(out) as e:
    raise checks.InputError(f"{what} {os.fspath(p)!r} is not writable ({_reason(e)}); choose a "
                            f"{'bucket' if is_url(out) else 'directory'} you can write to.") from None
  return out


def write_text_atomic(p: epath.Path, text: str) -> None:
  """Writes `text` to `p` so that a reader (or a killed writer) never sees half a file.

  A GCS object upload is atomic by itself; a local file is written beside and renamed.
  Raises WriteError (naming the file and the reason) if it cannot be written; a
  half-written temporary file is removed.
  """
  write_bytes_atomic(p, text.encode())


def write_bytes_atomic(p: epath.Path, data: bytes) -> None:
  """`write_text_atomic` for bytes (e.g. an npz archive)."""
  p = epath.Path(p)
  if is_url(p):
    try:
      p.write_bytes(data)
    except _errors(p) as e:
      raise WriteError(f"writing {p} failed ({_reason(e)}).") from e
    return
  tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(p)
  except OSError as e:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise WriteError(f"writing {p} failed ({_reason(e)}); the previous version of the file, "
                     "if any, is unchanged.") from e


def _errors(p: epath.Path) -> tuple[type[BaseException], ...]:
  """What a refused file operation on `p` raises: OSError, and gcsfs's HttpError (e.g. 401)."""
  if not is_url(p):
    return (OSError,)
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  return (OSError, HttpError)


def reason(e: BaseException) -> str:
  """A short one-line reason for a failed file operation (e.g. 'No space left on device')."""
  return _reason(e)


def _reason(e: BaseException) -> str:
  msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
  return " ".join(str(msg).split())[:300]
