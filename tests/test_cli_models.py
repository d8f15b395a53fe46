"""convert, list, info, verify and perplexity through the CLI, on the bundled demo checkpoint."""

import json

import pytest
from fakes import DEMO
from moe.cli import main


def moe_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def converted(capsys, isolated_home):
    code, out, err = moe_cli(capsys, "convert", str(DEMO))
    assert code == 0, err
    return out.strip()


def test_convert_prints_the_folder_and_list_shows_it(capsys, converted, isolated_home):
    assert converted == str(isolated_home / "moe" / "models" / "tinymix")
    code, out, _ = moe_cli(capsys, "list", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == ["tinymix"]
    code, out, _ = moe_cli(capsys, "list")
    assert code == 0 and "tinymix" in out and "mixtral" in out
    code, out, err = moe_cli(capsys, "convert", str(DEMO))
    assert code == 2 and out == "" and "--force" in err and err.count("\n") == 1


def test_info(capsys, converted):
    code, out, _ = moe_cli(capsys, "info", "tinymix", "--json")
    facts = json.loads(out)
    assert code == 0 and facts["architecture"] == "mixtral" and facts["experts"] == 8
    code, out, _ = moe_cli(capsys, "info", converted)
    assert code == 0 and "mixtral" in out and "M" in out


def test_verify_names_a_damaged_expert(capsys, converted, tmp_path):
    assert moe_cli(capsys, "verify", "tinymix") == (0, f"{converted}: ok\n", "")
    manifest = json.loads(open(f"{converted}/manifest.json").read())
    run = manifest["experts"]["2"][5]
    with open(f"{converted}/experts.bin", "r+b") as f:
        f.seek(run["offset"] + 7)
        byte = f.read(1)[0]
        f.seek(run["offset"] + 7)
        f.write(bytes([byte ^ 0x10]))
    code, out, err = moe_cli(capsys, "verify", converted)
    assert code == 1 and "layer 2 expert 5" in out and err.startswith("error: ") and err.count("\n") == 1


def test_unknown_model_is_bad_input(capsys):
    code, out, err = moe_cli(capsys, "info", "no-such-model")
    assert code == 2 and out == "" and "no-such-model" in err and "moe convert" in err


def test_perplexity(capsys, converted, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 8)
    code, out, err = moe_cli(capsys, "perplexity", "tinymix", str(text), "--ctx", "16", "--json")
    result = json.loads(out)
    assert code == 0, err
    assert result["tokens"] % 15 == 0 and 1 < result["perplexity"] < 50
    code, out, _ = moe_cli(capsys, "perplexity", "tinymix", str(text), "--ctx", "16", "--max-tokens", "32")
    assert code == 0 and float(out) > 1
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    code, out, err = moe_cli(capsys, "perplexity", "tinymix", str(tmp_path / "bad.txt"))
    assert code == 2 and out == "" and "bad.txt: not UTF-8" in err
