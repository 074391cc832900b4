import pytest

from .conftest import load_benchmark_module

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402


def test_export_fp16_halves_floats_copies_logs_and_skips_missing(tmp_path, capsys):
    bench = load_benchmark_module("export_fp16")
    run = tmp_path / "v"
    (run / "verifier").mkdir(parents=True)
    save_file({"w": torch.ones(2, 3), "step": torch.tensor([7])}, str(run / "verifier" / "model.safetensors"))
    (run / "verifier" / "config.json").write_text('{"a": 1}')
    (run / "log.jsonl").write_text('{"step": 1}\n')
    assert bench.main([str(tmp_path), str(tmp_path / "out"), "v:verifier:ver", "refl:reflector"]) == 0
    out = tmp_path / "out" / "ver"
    state = load_file(str(out / "model.safetensors"))
    assert state["w"].dtype == torch.float16 and torch.equal(state["w"].float(), torch.ones(2, 3))
    assert state["step"].dtype == torch.int64 and state["step"].item() == 7
    assert (out / "config.json").read_text() == '{"a": 1}' and (out / "run-log.jsonl").is_file()
    assert not (tmp_path / "out" / "refl").exists() and "missing" in capsys.readouterr().out
    assert bench.main([str(tmp_path), str(tmp_path / "out"), "bad"]) == 2
