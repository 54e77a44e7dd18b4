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

import contextlib
import errno
import functools
import json
import os
import shutil
import signal
import uuid

from absl import logging
from etils import epath

from asyncpatch_jax.runtime import checks

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
  """`p` as an epath.Path, by the one rule every mode uses for a workdir or a folder.

  A URL stays as it is (gs:// only). A local path has `~` expanded (also after `=`,
  where the shell leaves it) and is made absolute through the file system
  (`os.path.realpath`: symlinks resolved before `..`, as the operating system reads
  the path; epath alone would drop `link/..` textually and name another folder).
  Raises InputError for a URL scheme other than gs:// and for gs:// without gcsfs.
  Touches no file (a local path's symlinks are read) and no network.
  """
  text = os.fspath(p)
  if not is_url(text):
    return epath.Path(os.path.realpath(os.path.expanduser(text)))
  scheme = text.split("://", 1)[0]
  if scheme != "gs":
    raise checks.InputError(f"{what} {text!r}: only local paths and gs:// URLs are supported "
                            f"(got a {scheme}:// URL).")
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise checks.InputError(f"{what} {text!r} is a gs:// URL, which needs gcsfs; install the "
                            f"GCS extra: {INSTALL_GCS}.") from None
  gcs_access()
  return epath.Path(text)


@functools.cache
def gcs_access() -> str:
  """How this process reaches gs://, decided (and logged) once: 'emulator', 'anonymous' or 'credentials'.

  * STORAGE_EMULATOR_HOST set (a local GCS emulator, e.g. in the tests): gcsfs and
    tensorstore (the checkpoints; TENSORSTORE_GCS_HTTP_URL defaults to the same emulator)
    go there without credentials; tensorstore is given a placeholder token
    (GOOGLE_AUTH_TOKEN_FOR_TESTING) so it does not search for credentials either.
  * No emulator and no Application Default Credentials: anonymous access (public
    buckets only), said once as a warning with how to log in.
  * Credentials found: gcsfs and tensorstore use them as they are.
  Without credentials gcsfs is used without its storage-layout lookup (the default
  ExtendedGcsFileSystem asks the storage control API for the bucket type before every
  call and does not remember a failed answer, so each file operation repeated the whole
  credential search: 24 s per `exists()` where the GCE metadata server does not answer,
  and saves of several minutes on two processes). The filesystem class and the anonymous
  token are set for fsspec's `gs` protocol, which etils.epath uses.
  """
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    access = "emulator"
    logging.info("gs:// goes to the storage emulator at %s (STORAGE_EMULATOR_HOST), without "
                 "credentials.", emulator)
  else:
    import google.auth  # pylint: disable=g-import-not-at-top
    import google.auth.exceptions  # pylint: disable=g-import-not-at-top
    try:
      google.auth.default()
      return "credentials"
    except google.auth.exceptions.DefaultCredentialsError as e:
      access = "anonymous"
      logging.warning("gs://: no Google credentials were found (%s); using anonymous access, "
                      "which reaches public buckets only. Log in with `gcloud auth "
                      "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS.",
                      " ".join(str(e).split())[:200])
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf.setdefault(protocol, {})["token"] = "anon"
  return access


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


@contextlib.contextmanager
def replaced_files(folder, what: str = "output folder"):
  """Writes a few files into an existing `folder` (e.g. a workdir) as one unit.

  Yields an OutputFolder. On a local disk the files are written in a temporary folder
  inside `folder`, then moved into place in the order they were named, with SIGINT and
  SIGTERM held back for those few renames, so an interrupted or failed call leaves
  all of the previous files (or none of them) and never a mix. On gs:// each upload is
  atomic and they happen in the order named: name the file readers trust (the JSON that
  names the others) last. Call it on the one process that writes (process 0).
  """
  folder = path(folder, what)
  if is_url(folder):
    yield OutputFolder(folder, folder)
    return
  staging = folder / f".outputs.{uuid.uuid4().hex}.tmp"
  try:
    staging.mkdir(parents=True)
    out = OutputFolder(folder, staging)
    yield out
    with _signals_held():
      for name in dict.fromkeys(out.names):
        os.replace(staging / name, folder / name)
  except OSError as e:
    raise WriteError(f"writing {folder} failed ({_reason(e)}); its previous files are "
                     "unchanged.") from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(p, what: str = "output folder") -> epath.Path:
  """path(p), checking that `replaced_folder(p)` can write beside it (its parent is writable).

  Raises InputError naming `p` and the reason; `p` itself is not created or touched.
  """
  out = check_bucket(p, what)
  try:
    check_writable(out.parent, what)
  except checks.InputError as e:
    reason = str(e).rsplit(" is not writable (", 1)[-1].split(");", 1)[0]
    raise checks.InputError(f"{what} {os.fspath(p)!r} is not writable (its folder "
                            f"{os.fspath(out.parent)!r}: {reason}); choose a "
                            f"{'bucket' if is_url(out) else 'directory'} you can write "
                            "to.") from None
  return out


def precheck_writable(p, what: str = "workdir") -> epath.Path:
  """`check_writable` before there is a reason to write: check_bucket(p), leaving no trace.

  A local folder is not created: it, or its nearest existing parent, must be a folder
  this process may write in (os.access; a read-only file system is named). A gs:// URL
  gets the probe object, written and removed (GCS has no folders, so nothing remains;
  only a write tells whether the bucket takes one). `check_writable` still runs before
  the first write: it is the one that creates the folder.
  Raises InputError (naming the folder and the reason) as check_writable does.
  """
  out = check_bucket(p, what)
  if is_url(out):
    try:
      probe = out / f".write_test_{uuid.uuid4().hex}"
      probe.write_bytes(b"")
      probe.unlink()
    except _errors(out) as e:
      raise checks.InputError(f"{what} {os.fspath(p)!r} is not writable ({_reason(e)}); choose "
                              "a bucket you can write to.") from None
    return out
  existing = os.fspath(out)
  while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  problem = None
  if not os.path.isdir(existing):
    problem = os.strerror(errno.ENOTDIR)
  elif not os.access(existing, os.W_OK | os.X_OK):
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    problem = os.strerror(errno.EROFS if read_only else errno.EACCES)
  if problem is not None:
    raise checks.InputError(f"{what} {os.fspath(p)!r} is not writable ({problem}); choose a "
                            "directory you can write to.")
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


MANIFEST = "manifest.json"


class OutputFolder:
  """The folder one call writes its outputs into (see `replaced_folder`).

  `file(name)` is where to write `name` (in a temporary folder on a local disk);
  `final(name)` is where it will be once the call has finished (for the paths a call
  reports, e.g. in settings.json).
  """

  def __init__(self, final: epath.Path, staging: epath.Path):
    self.final_dir, self.staging, self.names = final, staging, []

  def file(self, name: str) -> epath.Path:
    self.names.append(name)
    return self.staging / name

  def final(self, name: str) -> str:
    return os.fspath(self.final_dir / name)


@contextlib.contextmanager
def replaced_folder(dest, what: str = "output folder"):
  """Writes the new contents of the folder `dest` as one unit: all of it, or nothing.

  Yields an OutputFolder. On a local disk the files go to a fresh folder beside `dest`
  (`.<name>.<random>.tmp`), which then replaces `dest` by renames: the previous folder
  is renamed aside and removed, so `dest` holds exactly one call's outputs; if the call
  fails or is interrupted (Ctrl-C, a full disk), the temporary folder is removed and
  `dest` keeps the previous call's outputs. gs:// has no rename: the previous call's
  `manifest.json` is deleted first, the files are written in place, then a new
  `manifest.json` listing them is written last and the files it does not list are
  removed; a reader trusts only what the manifest lists (none while it is absent).
  Call it on the one process that writes (process 0).
  """
  dest = path(dest, what)
  if is_url(dest):
    manifest = dest / MANIFEST
    try:
      if manifest.exists():
        manifest.unlink()
      out = OutputFolder(dest, dest)
      yield out
      write_text_atomic(manifest, json.dumps({"files": sorted(set(out.names))}, indent=2))
      for old in dest.iterdir():
        if old.name not in set(out.names) | {MANIFEST} and old.is_file():
          old.unlink()
    except _errors(dest) as e:
      raise WriteError(f"writing {dest} failed ({_reason(e)}); it has no {MANIFEST}, so "
                       "nothing in it counts as written; rerun the same command.") from e
    return
  tag = uuid.uuid4().hex
  staging = dest.parent / f".{dest.name}.{tag}.tmp"
  aside = dest.parent / f".{dest.name}.{tag}.old"
  try:
    staging.mkdir(parents=True)
    yield OutputFolder(dest, staging)
    with _signals_held():          # the two renames are not split by Ctrl-C or SIGTERM
      if dest.exists():
        dest.rename(aside)
      try:
        staging.rename(dest)
      except OSError:
        if aside.exists() and not dest.exists():
          aside.rename(dest)         # the previous folder back in its place
        raise
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, OSError):
      raise WriteError(f"writing {dest} failed ({_reason(e)}); its previous contents are "
                       "unchanged.") from e
    raise
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
  """SIGINT and SIGTERM wait (are blocked) inside the block, then arrive."""
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
