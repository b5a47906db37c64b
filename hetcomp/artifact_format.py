"""The artifact format, and the rule every output of hetcomp follows: never lose a user's file.

An artifact is a folder::

    DIR/manifest.json   model, source hash, config, dtype, kv_dtype, target, TVM version, files,
                        params
    DIR/lib.so          the compiled Relax VM executable (all kernels)
    DIR/params.bin      packed weights, concatenated raw little-endian arrays (64-byte aligned)
    DIR/tokenizer.json  the HF ``tokenizers`` serialisation
    DIR/datastore.npy   (with heads, optional) token ids the lookup draft searches

The manifest carries its own digest (hand edits are refused) and the SHA-256 of every file.

Outputs (artifacts, profile kits, tune folders, heads files, plans) are written to a temporary
sibling and renamed into place. An existing output is replaced only when it is of the same
kind and the caller passed ``force``; anything else there (a user's folder, a file) is refused
before any work is done and left as it was.

Ground floor: standard library and numpy only, so the runtime reads artifacts without the
compiler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from .errors import HetcompError

#: 2: ``prefill_w{C}`` takes ``rows`` before the caches (``frontend/llama.py``). 3: ``medusa``
#: takes the verify call's hidden rows and a node list, and returns the tree's tokens.
FORMAT = "hetcomp-artifact/3"
#: Candidates per head the ``medusa`` function ranks (the trees' rank bound): ``top[K, 10]``.
MEDUSA_TOPK = 10
#: Prompt rows per ``prefill`` call: the runtime prefills in chunks of this many tokens through
#: the static ``prefill_w{C}`` (a shorter last chunk padded), so that its kernels tile rows
#: exactly (3x the GFLOP/s of symbolic-width kernels here, at any chunk of 32-128 rows); the
#: manifest's ``workspace_bytes`` are sized for it.
PREFILL_CHUNK = 64
#: The lookup draft's datastore in an artifact (:mod:`hetcomp.speculative.datastore`): an
#: int32 ``.npy`` of token ids, sequences separated by -1; optional, listed in ``files``.
DATASTORE_FILE = "datastore.npy"
_ALIGN = 64


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest without its own ``digest`` field (detects hand edits)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_params(path: str, params: list[tuple[str, np.ndarray]]) -> list[dict]:
    """Write ``params`` as 64-byte aligned raw arrays; returns the index the manifest keeps."""
    index, offset = [], 0
    with open(path, "wb") as fh:
        for name, arr in params:
            arr = np.ascontiguousarray(arr)
            pad = (-offset) % _ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(memoryview(arr.reshape(-1)).cast("B"))  # no copy (tobytes makes one)
            index.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "offset": offset, "nbytes": int(arr.nbytes)})
            offset += arr.nbytes
    return index


def read_manifest(path: str) -> dict:
    """The checked manifest of the artifact folder ``path`` (one-line errors otherwise)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise HetcompError(f"artifact folder not found: {path}")
    if not os.path.isfile(mpath):
        raise HetcompError(f"not a hetcomp artifact (no manifest.json): {path}")
    try:
        with open(mpath, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError: a ValueError
        raise HetcompError(f"corrupt manifest.json in {path}: {_first_line(e)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HetcompError(f"not a hetcomp artifact (format is not {FORMAT}): {path}")
    if manifest.get("digest") != manifest_digest(manifest):
        raise HetcompError(f"manifest.json was edited after compilation: {path}")
    return manifest


def check_files(path: str, manifest: dict, verify_params: bool = True) -> None:
    """Refuse, in one line, an artifact whose files are not those its manifest records: each
    present (``params.bin`` may come later, when compiled with separate weights), of its
    recorded size, and ``lib.so`` and ``tokenizer.json`` (and ``params.bin`` with
    ``verify_params``) of their SHA-256."""
    files = manifest["files"]
    lean = not manifest.get("weights_attached", True)
    for name, entry in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            if lean and name == "params.bin":
                continue
            raise HetcompError(f"artifact is missing {name}: {path}")
        if "bytes" in entry and os.path.getsize(f) != entry["bytes"]:
            raise HetcompError(f"artifact file {name} has the wrong size (damaged or "
                               f"replaced): {path}")
        if "sha256" in entry and (name != "params.bin" or verify_params) and \
                sha256_file(f) != entry["sha256"]:
            raise HetcompError(f"artifact file {name} does not match its manifest (damaged "
                               f"or replaced): {path}")


def kv_dtype(manifest: dict) -> str:
    """The KV cache's element type an artifact was compiled for (manifests written before
    ``--kv-dtype`` existed hold none: their caches are float32)."""
    return manifest.get("kv_dtype") or "float32"


def holds_format(path: str, name: str, fmt: str) -> bool:
    """True when the folder ``path`` has a JSON file ``name`` whose ``format`` is ``fmt``: how
    an output recognises an earlier output of its kind (checked or not: a damaged one may
    still be replaced by a new one)."""
    try:
        with open(os.path.join(path, name)) as fh:
            return json.load(fh).get("format") == fmt
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def is_artifact(path: str) -> bool:
    """True when ``path`` holds an artifact manifest."""
    return holds_format(path, "manifest.json", FORMAT)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: What hetcomp's plots carry (``savefig(..., metadata=PLOT_METADATA)``: a PNG text chunk),
#: so that a plot replaces a plot of ours, never a user's image.
PLOT_METADATA = {"Software": "hetcomp"}
_PLOT_MARK = b"tEXtSoftware\x00hetcomp"


def is_png(path: str) -> bool:
    """True when the file ``path`` starts as a PNG image does."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def is_plot(path: str) -> bool:
    """True when ``path`` is a PNG plot hetcomp wrote (its text chunk, ahead of the image
    data, says so)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(PNG_MAGIC) and _PLOT_MARK in head


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# Outputs --------------------------------------------------------------------------------------
def check_output(path: str, is_same_kind: Callable[[str], bool], what: str,
                 force: bool = False) -> None:
    """Refuse to write ``what`` at ``path`` unless nothing is there, an empty folder is, or
    (with ``force``) an output of the same kind is, and unless its folder can be made or
    written. Call before any long work."""
    path = os.path.abspath(path)
    _check_parent(path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    if is_same_kind(path):
        if force:
            return
        raise HetcompError(f"{path} holds a {what} already: pass --force to replace it")
    kind = "folder" if os.path.isdir(path) else "file"
    raise HetcompError(f"{path} is a {kind} that is not a {what}: refusing to replace it "
                       "(choose another output path)")


def _check_parent(path: str) -> None:
    """The folder that will hold ``path``: an existing one to write in, or one to make under
    the nearest existing ancestor, which must be a folder (one line otherwise: the rename
    into place would fail after the work)."""
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise HetcompError(f"cannot write {path}: {parent} is a file, not a folder")
    # A trial folder, made and removed: permission bits do not tell (root may write any
    # folder by them, yet not /proc or a read-only mount).
    try:
        os.rmdir(new_temporary(parent, folder=True))
    except OSError as e:
        raise HetcompError(f"cannot write {path}: the folder {parent} is not writable "
                           f"({e.strerror or _first_line(e)})") from None


def check_output_file(path: str, is_same_kind: Callable[[str], bool] | None = None,
                      what: str = "", force: bool = True) -> None:
    """:func:`check_output` for a file output (:func:`output_file`): a folder there is
    refused too. Call before any long work."""
    path = os.path.abspath(path)
    if is_same_kind is not None:
        check_output(path, is_same_kind, what, force)
    else:
        _check_parent(path)
    if os.path.isdir(path):
        raise HetcompError(f"{path} is a folder: give a file path")


def new_temporary(parent: str, suffix: str = "", folder: bool = False) -> str:
    """Create a fresh, empty temporary file (or folder) in ``parent`` and return its path.

    It gets the mode ``open``/``mkdir`` give a new file (0666/0777 less the umask, which the
    kernel applies), so the output renamed from it has it too; ``tempfile``'s are private
    (0600/0700), and reading the umask to widen them would briefly change it for every
    thread. Raises ``OSError`` as ``mkstemp`` does.
    """
    for _ in range(100):
        path = os.path.join(parent, f".hetcomp-tmp-{secrets.token_hex(6)}{suffix}")
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {parent}")


def _make_parent(path: str) -> str:
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise HetcompError(f"cannot create the folder of {path}: {_first_line(e)}") from None
    return parent


@contextlib.contextmanager
def output_dir(path: str, is_same_kind: Callable[[str], bool], what: str,
               force: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    The check of :func:`check_output` runs first and again just before the rename (the
    folder may have changed meanwhile); on any error the temporary folder is removed and
    ``path`` is untouched.
    """
    path = os.path.abspath(path)
    check_output(path, is_same_kind, what, force)
    parent = _make_parent(path)
    try:
        tmp = new_temporary(parent, folder=True)
    except OSError as e:
        raise HetcompError(f"cannot write {path}: {_first_line(e)}") from None
    try:
        yield tmp
        check_output(path, is_same_kind, what, force)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".hetcomp-old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_file(path: str, is_same_kind: Callable[[str], bool] | None = None,
                what: str = "", force: bool = True) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``.

    ``is_same_kind``: where given, an existing ``path`` must pass it (and ``force``) to be
    replaced, as for folders. The suffix of ``path`` is kept (numpy's savez appends
    ``.npz`` to names without it).
    """
    path = os.path.abspath(path)
    check_output_file(path, is_same_kind, what, force)
    parent = _make_parent(path)
    try:
        tmp = new_temporary(parent, suffix=os.path.splitext(path)[1])
    except OSError as e:
        raise HetcompError(f"cannot write {path}: {_first_line(e)}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_npz(path: str):
    """The ``.npz`` archive at ``path`` (``np.load``, no pickles), or ``ValueError`` for any
    other file: numpy reads those as a bare ``.npy`` array or as pickled data, and its
    message for a text file then spoke of pickles, not of the wrong file."""
    with open(path, "rb") as fh:
        if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's (empty: its end)
            raise ValueError("not an .npz archive")
    return np.load(path, allow_pickle=False)


def write_json(path: str, data, **kwargs) -> None:
    """Write JSON through :func:`output_file` (never a half-written file)."""
    with output_file(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, **kwargs)
