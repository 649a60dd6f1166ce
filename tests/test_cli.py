"""The `h3moe` console script: fuse / train / generate on tiny local models, errors, atomic --out."""
import json
import os
import pytest
import torch

pytest.importorskip("transformers")

from h3moe.cli import main  # noqa: E402
from h3moe.fusion import tiny  # noqa: E402
from h3moe.fusion.data import char_tokenizer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread sync on shared cores costs more than the math
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Three tiny expert dirs (same architecture, different FFNs) with a saved tokenizer, and data."""
    d = tmp_path_factory.mktemp("cli")
    tok = char_tokenizer()
    for i, t in enumerate(tiny.TASKS):
        m = tiny.tiny_llama(tokenizer=tok, hidden_size=32, intermediate_size=64, seed=100 + i)
        m.save_pretrained(d / t)
        tok.save_pretrained(d / t)
    with open(d / "data.jsonl", "w") as f:
        for t in tiny.TASKS:
            for r in tiny.make_records(t, 12, seed=3):
                f.write(json.dumps(r) + "\n")
    return d


def _experts(d):
    return sum((["--expert", str(d / t)] for t in tiny.TASKS), [])


def _leftovers(d):
    return [n for n in os.listdir(d) if ".tmp-" in n or ".old-" in n]


def test_fuse_train_generate(work, capsys):
    d = work
    assert main(["fuse", *_experts(d), "--base", str(d / "helpful"), "--out", str(d / "fused"),
                 "--router-init", "hidden", "--prompts", str(d / "data.jsonl"), "--num-prompts", "4"]) == 0
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(d / "fused"))
    cfg = json.loads((d / "fused" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 3
    assert cfg["h3fusion_experts"] == list(tiny.TASKS)
    assert main(["train", "--model", str(d / "fused"), "--data", str(d / "data.jsonl"), "--out", str(d / "trained"),
                 "--steps", "3", "--batch-size", "6", "--gamma", "0.01", "--quiet", "--grad-accum", "2",
                 "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((d / "trained" / "config.json").read_text())
    assert cfg.get("use_cache", True)  # saved as it came: checkpointing turned the cache off only to train
    assert "router accuracy helpful" in out and "gate" in out
    assert main(["generate", "--model", str(d / "trained"), "--prompt", "3+4=", "--prompt", "echo abcd:",
                 "--max-new-tokens", "5"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "->" in l]
    assert len(lines) == 2 and lines[0].startswith("'3+4=' ->") and "[router: helpful" in lines[0]
    # the same model with NF4 experts (nested absmax): the memory report, then the generations
    assert main(["generate", "--model", str(d / "trained"), "--prompt", "3+4=", "--max-new-tokens", "5",
                 "--quantize", "nf4", "--double-quant", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    report = next(l for l in out if l.startswith("h3moe.quantize(nf4"))
    before, after = (float(v.split()[0]) for v in report.split("experts ")[1].split(" MiB, model")[0].split("->"))
    assert after < before / 3  # 4.5 bits per weight (+ nested absmax) instead of 32
    assert sum("->" in l and l.startswith("'3+4=' ->") for l in out) == 1
    assert not _leftovers(d)


def test_bad_jsonl_names_the_line(work, capsys):
    d = work
    main(["fuse", *_experts(d), "--out", str(d / "f_bad"), "--force"])
    capsys.readouterr()
    good = json.dumps({"prompt": "1+1=", "response": "2", "task": "honest"})
    cases = [
        ("{not json", ":3: not valid JSON"),  # broken JSON on line 3
        (json.dumps({"prompt": "x", "task": "honest"}), ":3: missing key 'response'"),  # a field missing
        (json.dumps({"prompt": "x", "response": "y", "task": "evil"}), ":3: task 'evil'"),  # unknown task
        (json.dumps(["a", "b"]), ":3: expected a JSON object"),  # not an object
    ]
    for bad, msg in cases:
        (d / "bad.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n")  # line 2 blank: skipped, still counted
        assert main(["train", "--model", str(d / "f_bad"), "--data", str(d / "bad.jsonl"),
                     "--out", str(d / "t_bad"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("h3moe: error:") and msg in err, err
        assert not os.path.exists(d / "t_bad")
    assert not _leftovers(d)


def test_bad_paths_and_no_half_written_out(work, capsys):
    d = work
    assert main(["fuse", "--expert", str(d / "nope"), "--expert", str(d / "honest"), "--out", str(d / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err and not os.path.exists(d / "x")
    assert main(["train", "--model", str(d / "honest"), "--data", str(d / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    (d / "one.jsonl").write_text("")  # a bad --grad-accum is refused before any model loads (honest is no fusion)
    assert main(["train", "--model", str(d / "honest"), "--data", str(d / "one.jsonl"), "--batch-size", "6",
                 "--grad-accum", "4"]) == 2
    assert "--grad-accum 4" in capsys.readouterr().err
    # A failure in the middle of fusing (mismatched sizes) leaves neither --out nor a temp dir.
    tok = char_tokenizer()
    tiny.tiny_llama(tokenizer=tok, hidden_size=32, intermediate_size=48).save_pretrained(d / "odd")
    assert main(["fuse", *_experts(d), "--expert", str(d / "odd"), "--out", str(d / "y")]) == 2
    assert "intermediate_size" in capsys.readouterr().err
    assert not os.path.exists(d / "y") and not _leftovers(d)
    # An existing --out is kept unless --force, and replaced whole with it.
    (d / "z").mkdir()
    (d / "z" / "keep.txt").write_text("x")
    assert main(["fuse", *_experts(d), "--out", str(d / "z")]) == 2
    assert "--force" in capsys.readouterr().err and os.listdir(d / "z") == ["keep.txt"]
    assert main(["fuse", *_experts(d), "--out", str(d / "z"), "--force"]) == 0
    assert "keep.txt" not in os.listdir(d / "z") and "config.json" in os.listdir(d / "z")
    assert not _leftovers(d)


def test_info_and_console_script(capsys):
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts") if e.name == "h3moe"] == ["h3moe.cli:main"]
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("h3moe 0.1.0") and "torch " in out and "transformers" in out
    assert "backends:" in out and "torch: yes" in out


def test_demo_quick(monkeypatch, capsys):
    from h3moe import demo

    monkeypatch.setenv("H3MOE_DEMO_QUICK", "1")
    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "torch " in out and "fastest here:" in out
    assert "router accuracy per task" in out and "after training" in out
    assert "identical logits: True" in out
