"""What every Hugging Face model family shares: config.json, model.safetensors, checks, writing.

    config = read_config("gpt2-dir", model_types=("gpt2",))    # dict, or a one-line error
    tensors = read_weights("gpt2-dir")                          # name -> float32 NumPy array
    check_tensors(path, tensors, {"wte.weight": (50257, 768)})  # names and shapes, exactly
    write_pretrained("out-dir", config, tensors, {"vocab.json": "..."})

The safetensors format: 8 bytes (little-endian u64) giving the header's length N, N bytes of
JSON header ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}``, then the raw little-endian tensor bytes. The ``safetensors`` library
reads and checks it; only bfloat16, which NumPy has no type for, is read here from the byte
offsets in the header: a bfloat16 is the top 16 bits of a float32, so shifting its bits left
by 16 gives the float32 of exactly the same value.

Every error names the file; a tensor error also names the tensor, the expected and the actual
shape.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from tinylm.files import fsync_dir, read_json_object, temporary_sibling, write_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")

# safetensors dtype names of the floating-point tensors tinylm converts to the asked dtype.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _check_directory(directory) -> Path:
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(
            f"{str(directory)!r} is not a directory; expected a Hugging Face model directory "
            f"holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    return directory


def read_config(directory, model_types: tuple[str, ...]) -> dict:
    """The config.json of a Hugging Face model directory, whose model_type is one of model_types.

    Raises FileNotFoundError when the directory or the file is missing, and ValueError naming
    the file when it is not a JSON object or its ``model_type`` is not in ``model_types``.
    """
    directory = _check_directory(directory)
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; a Hugging Face model directory holds {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}"
        )
    config = read_json_object(path, "model config")
    model_type = config.get("model_type")
    if model_type not in model_types:
        expected = " or ".join(repr(t) for t in model_types)
        raise ValueError(
            f"model config {str(path)!r}: model_type is {model_type!r}, expected {expected}"
        )
    return config


def read_weights(directory, dtype=np.float32) -> dict[str, np.ndarray]:
    """The tensors of ``directory/model.safetensors`` as NumPy arrays, name -> array.

    Floating-point tensors (float64, float32, float16, bfloat16) come in as ``dtype``
    (``None`` keeps float64/float32/float16 as stored and turns bfloat16 into float32); other
    tensors (integers, bools) as stored. Raises FileNotFoundError when there is no
    model.safetensors (saying how to make one when only pickled weights are there) and
    ValueError naming the file when it is truncated or corrupt.
    """
    directory = _check_directory(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).exists()]
        if pickled:
            raise FileNotFoundError(
                f"{str(directory)!r} holds {pickled[0]} but no {WEIGHTS_NAME}: tinylm never "
                "unpickles weights (a pickle can run any code); convert it once with "
                "transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)"
            )
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    header = read_safetensors_header(path)
    tensors = {}
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if header[name]["dtype"] != "BF16":
                    tensors[name] = f.get_tensor(name)
    except Exception as err:  # SafetensorError, OSError, ...: the file is not what it says
        raise ValueError(f"{str(path)!r} cannot be read as safetensors: {err}") from err
    for name, info in header.items():
        if info["dtype"] == "BF16":
            tensors[name] = _read_bfloat16(path, header, name)
        if dtype is not None and info["dtype"] in FLOAT_DTYPES:
            tensors[name] = tensors[name].astype(dtype, copy=False)
    return {name: tensors[name] for name in header}  # in the file's order


def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file: name -> {"dtype", "shape", "data_offsets"}.

    Checks what the format promises (a header that fits the file, offsets inside the data) and
    raises ValueError naming the file otherwise. ``__metadata__`` is left out.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(
                f"{str(path)!r} is truncated or not safetensors: {size} bytes, shorter than the "
                "8-byte header length"
            )
        (n,) = struct.unpack("<Q", first)
        if n > size - 8:
            raise ValueError(
                f"{str(path)!r} is truncated or not safetensors: the header says it is {n} "
                f"bytes long but the file has {size - 8} after the length"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is corrupt: its safetensors header is not JSON") from err
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is corrupt: its safetensors header is not an object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            info["dtype"], info["shape"]  # noqa: B018  (both must be present)
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(
                f"{str(path)!r} is corrupt: tensor {name!r} has a malformed header entry"
            ) from err
        if not 0 <= begin <= end <= data_size:
            raise ValueError(
                f"{str(path)!r} is truncated: tensor {name!r} needs bytes {begin}..{end} of the "
                f"data but the file holds {data_size}"
            )
    return header


def _read_bfloat16(path: Path, header: dict, name: str) -> np.ndarray:
    """A bfloat16 tensor as float32: its 16 bits are the top half of the same float32."""
    info = header[name]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != 2 * count:
        raise ValueError(
            f"{str(path)!r} is corrupt: bfloat16 tensor {name!r} of shape {shape} needs "
            f"{2 * count} bytes, the header gives {end - begin}"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + begin)
        bits = np.fromfile(f, dtype="<u2", count=count)  # (count,) uint16
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def check_tensors(file, tensors: dict, expected: dict[str, tuple]) -> None:
    """Names and shapes of ``tensors`` must be exactly ``expected`` (name -> shape).

    Raises ValueError naming the file, the first missing, extra or misshapen tensor, and the
    expected and actual shape.
    """
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(
                f"{str(file)!r}: tensor {name!r} of shape {tuple(shape)} is missing"
                f" ({_count_missing(tensors, expected)} missing in all)"
            )
    for name in tensors:
        if name not in expected:
            raise ValueError(
                f"{str(file)!r}: unexpected tensor {name!r} of shape "
                f"{tuple(tensors[name].shape)}; the config has no place for it"
            )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(
                f"{str(file)!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(shape)}"
            )


def _count_missing(tensors, expected) -> int:
    return sum(1 for name in expected if name not in tensors)


def write_pretrained(
    directory,
    config: dict,
    tensors: dict[str, np.ndarray],
    extra_files: dict[str, str | bytes] | None = None,
    new: bool = False,
) -> Path:
    """Write a Hugging Face model directory: config.json, model.safetensors, extra files.

    The directory is created if missing. An existing directory may only hold files that this
    call writes (a previous save): those are replaced, each atomically, so a crash leaves every
    file either old or new and never half written. A directory holding anything else is refused
    with a ValueError listing what is there; tinylm never deletes or overwrites what it did not
    write. The safetensors file carries ``{"format": "pt"}`` as its metadata, which
    ``transformers`` requires. Returns the directory as a Path.

    With ``new`` (tinylm export), the directory must not exist or be empty: the files are
    written into a fresh sibling ``NAME.tmp-XXXXXXXX/`` and that is renamed to NAME, so the
    directory appears complete or not at all (the rename fails, and nothing is written there,
    if NAME has meanwhile got files).
    """
    directory = Path(directory)
    extra_files = dict(extra_files or {})
    names = [CONFIG_NAME, WEIGHTS_NAME, *extra_files]
    for name in extra_files:
        if Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME):
            raise ValueError(f"extra file name {name!r} must be a plain file name of its own")
    if new:
        return _write_new_directory(directory, config, tensors, extra_files)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{str(directory)!r} exists and is not a directory")
        others = sorted(p.name for p in directory.iterdir() if p.name not in names)
        if others:
            more = f" and {len(others) - 10} more" if len(others) > 10 else ""
            shown = ", ".join(others[:10]) + more
            raise ValueError(
                f"{str(directory)!r} already holds files tinylm would not write ({shown}); "
                "choose an empty or new directory"
            )
    directory.mkdir(parents=True, exist_ok=True)
    _write_files(directory, config, tensors, extra_files)
    return directory


def _write_files(directory: Path, config: dict, tensors: dict, extra_files: dict) -> None:
    for name, array in tensors.items():
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a NumPy array, got {type(array).__name__}")
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    write_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    mode = (directory / CONFIG_NAME).stat().st_mode & 0o777  # what the umask gives a new file
    _write_safetensors_atomic(directory / WEIGHTS_NAME, arrays, {"format": "pt"}, mode)
    for name, data in extra_files.items():
        write_atomic(directory / name, data)


def _write_new_directory(directory: Path, config, tensors, extra_files) -> Path:
    """write_pretrained(new=True): every file into a fresh sibling, then one rename."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(
            f"{str(directory)!r} already exists and is not an empty directory; choose a new "
            "directory (tinylm never writes over existing files)"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(directory)
    tmp.mkdir()  # with the permissions the umask gives a new directory
    try:
        _write_files(tmp, config, tensors, extra_files)
        try:
            os.rename(tmp, directory)  # replaces an empty directory; never a non-empty one
        except OSError as err:
            raise ValueError(
                f"{str(directory)!r} could not be created ({err.strerror}); nothing was "
                "written there"
            ) from err
    except BaseException:
        for path in tmp.iterdir():  # only the files written above
            path.unlink()
        tmp.rmdir()
        raise
    fsync_dir(directory.parent)
    return directory


def _write_safetensors_atomic(path: Path, tensors: dict, metadata: dict, mode: int) -> None:
    """safetensors.numpy.save_file into a temporary sibling, fsync, then rename over ``path``."""
    tmp = temporary_sibling(path)
    try:
        safetensors.numpy.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # safetensors makes its files readable by their owner only
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
