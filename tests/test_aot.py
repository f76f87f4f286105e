"""Prebuilt kernels are portable: built for x86-64-v3, marked with the level they need, and
checked against the running CPU before they are imported."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import symgate as sg
from symgate import _aot

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_aot, "_WARNED", set())


def _prebuilt_hash() -> str:
    g = sg.compile(sg.cells.builtin("gru")).generated
    return g.content_hash


def _prebuilt_files() -> list[Path]:
    return sorted(Path(_aot.__file__).parent.joinpath("_kernels").glob("k_*"))


def test_aot_flags_replace_native_by_the_portable_level() -> None:
    flags = _aot.aot_cflags("x86_64")
    assert "-march=native" not in flags and flags[-1] == "-march=x86-64-v3"
    assert not any(f.startswith("-march") for f in _aot.aot_cflags("aarch64"))  # the compiler's default target
    assert _aot.target_isa("aarch64") == "baseline" and _aot.missing_features("baseline", frozenset()) == []


def test_every_prebuilt_module_records_the_level_it_was_built_for() -> None:
    files = _prebuilt_files()
    assert files, "no prebuilt kernels installed (SYMGATE_NO_AOT?)"
    assert {_aot.module_isa(f) for f in files} == {_aot.target_isa()}


@pytest.mark.skipif(not X86, reason="the AVX-512 check is about x86-64 builds")
def test_prebuilt_modules_contain_no_avx512_code() -> None:
    # this machine has AVX-512 (-march=native would use zmm registers); x86-64-v3 has none
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with gcc) is needed to read the prebuilt modules"
    for f in _prebuilt_files()[:4]:
        text = subprocess.run([objdump, "-d", str(f)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in text, f"{f.name} holds AVX-512 instructions"
        assert "%ymm" in text  # ... but it is vectorised for AVX2


def test_a_prebuilt_module_loads_on_a_cpu_with_its_features() -> None:
    k = sg.compile(sg.cells.builtin("gru"))
    assert k.origin == "ahead-of-time"
    assert k.module.ISA == _aot.target_isa() and _aot.missing_features(k.module.ISA) == []


@pytest.mark.hostile("result")
def test_a_module_needing_a_feature_the_cpu_lacks_is_not_loaded(monkeypatch: pytest.MonkeyPatch,
                                                                fresh_warnings: None) -> None:
    if not X86:
        pytest.skip("prebuilt kernels elsewhere use the compiler's default target (no level to lack)")
    h = _prebuilt_hash()
    assert _aot.load(h) is not None
    monkeypatch.setattr(_aot, "cpu_flags", lambda: frozenset({"sse2", "popcnt", "ssse3"}))  # no AVX2
    with pytest.warns(sg.SymgateWarning, match=r"need x86-64-v3 and this CPU lacks .*avx2.*compiled for this CPU"):
        assert _aot.load(h) is None
    assert _aot.load(h) is None  # warned once per process
    # a kernel then comes from the cache, compiled for this CPU (native), and still agrees
    cell = sg.cells.builtin("gru", bias=False)
    cell._index.clear()
    k = sg.compile(cell)
    assert k.origin == "cache" and getattr(k.module, "ISA", None) is None


@pytest.mark.hostile("result")
@pytest.mark.parametrize("content, why", [
    (b"\x7fELF....no marker here....", "no instruction-set marker"),
    (b"\x7fELF..symgate-isa=x86-64-v9;..", "unknown instruction set 'x86-64-v9'"),
])
def test_a_module_without_a_known_level_is_not_loaded(tmp_path: Path, content: bytes, why: str,
                                                      fresh_warnings: None) -> None:
    f = tmp_path / "k_fake.so"
    f.write_bytes(content)
    with pytest.warns(sg.SymgateWarning, match=why.replace("(", r"\(").replace(")", r"\)")):
        assert not _aot._runnable(str(f))


def test_levels_nest_and_name_their_features() -> None:
    v2, v3 = set(_aot.ISA_FEATURES["x86-64-v2"]), set(_aot.ISA_FEATURES["x86-64-v3"])
    assert v2 < v3 and {"avx2", "fma", "bmi2", "movbe"} <= v3
    have = frozenset(_aot.ISA_FEATURES["x86-64-v2"])
    assert _aot.missing_features("x86-64-v2", have) == [] and "avx2" in _aot.missing_features("x86-64-v3", have)
