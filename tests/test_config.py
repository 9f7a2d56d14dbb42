"""The typed training configuration and the preflight: values parsed by type (YAML 1.1's ``2e-4``
is a string), ranges checked, every bad field reported at once naming the field and the accepted
values, unknown keys with a did-you-mean, dotted ``--set`` keys, every field with a help text and a
resume rule, and every check that needs no model run before any model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pytest
import typer
import yaml
from typer.testing import CliRunner

from mmkit.errors import ConfigError, DataError
from mmkit.training.config import (
    IGNORED, MUST_MATCH, RESUME_RULES, ConfigProblems, TrainConfig, fields_with_rule, parse_assignments,
    resolve_config, save_config,
)
from mmkit_cli import train_cmd


# -- the command line, in process -----------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, tmp_path):
    """``cli(*args)`` runs ``mmkit train ARGS``; the training itself must never be reached."""
    import mmkit.training.recipe as recipe

    def no_model(*_a, **_k):
        raise AssertionError("training (and the model load) was reached")

    monkeypatch.setattr(recipe, "train", no_model)
    monkeypatch.setattr(recipe, "assemble", no_model)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    train_cmd.register(app)

    def run(*args: str):
        return CliRunner().invoke(app, ["train", *map(str, args)])

    return run


def refused(result, *fragments: str) -> str:
    """A configuration error: exit status 2, one clean message, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result.output


# -- parsing by type ------------------------------------------------------------------------------
def test_yaml_scientific_numbers_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-4\nprojector_lr: 1e-3\nmax_steps: 1e2\nmicro_batch_size: '4'\nshuffle: 'no'\n")
    assert yaml.safe_load(path.read_text())["lr"] == "2e-4"  # the YAML 1.1 trap this guards against
    cfg = resolve_config(path, {})
    assert (cfg.lr, cfg.projector_lr, cfg.max_steps, cfg.micro_batch_size, cfg.shuffle) == (2e-4, 1e-3, 100, 4, False)
    assert type(cfg.lr) is float and type(cfg.max_steps) is int
    assert resolve_config(None, parse_assignments(["lr=1e-4"])).lr == 1e-4


def test_micro_batch_size_eight_fails_before_model_load_naming_the_field(cli, tmp_path):
    refused(cli("--set", "micro_batch_size=eight"), "micro_batch_size 'eight': not an integer; use an integer >= 1")
    config = tmp_path / "bad.yaml"
    config.write_text("micro_batch_size: eight\nlr: 2e-4\n")
    refused(cli("--config", config), "micro_batch_size 'eight'", f"(from {config})")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_every_bad_field_is_reported_at_once_with_its_accepted_range():
    with pytest.raises(ConfigProblems) as caught:
        resolve_config(None, {"lr": -0.5, "lora_r": 0, "log_every": 0, "lora_dropout": 2, "num_workers": -1,
                              "num_threads": -3, "max_steps": -5, "epochs": -3, "micro_batch_size": "eight"})
    assert sorted(name for name, _ in caught.value.problems) == sorted(
        ["lr", "lora_r", "log_every", "lora_dropout", "num_workers", "num_threads", "max_steps", "epochs",
         "micro_batch_size"])
    text = str(caught.value)
    assert text.startswith("9 problems in the configuration:")
    for line in ("lr -0.5: out of range; use a number > 0", "lora_r 0: out of range; use an integer >= 1",
                 "log_every 0: out of range; use an integer >= 1",
                 "lora_dropout 2: out of range; use a number in [0, 1)",
                 "num_workers -1: out of range; use an integer >= 0",
                 "num_threads -3: out of range; use an integer >= 1 (or auto: torch's default)",
                 "max_steps -5: out of range; use an integer >= 1 (or unset: from epochs)",
                 "epochs -3: out of range; use a number > 0"):
        assert f"  - {line}" in text


def test_values_that_are_not_numbers_or_not_finite():
    for values, message in [({"lr": "fast"}, "lr 'fast': not a number"),
                            ({"lr": float("nan")}, "lr nan: not a finite number"),
                            ({"epochs": "inf"}, "epochs 'inf': not a finite number"),
                            ({"micro_batch_size": 2.5}, "micro_batch_size 2.5: not an integer"),
                            ({"micro_batch_size": True}, "micro_batch_size True: not an integer"),
                            ({"shuffle": "maybe"}, "shuffle 'maybe': use true or false"),
                            ({"output_dir": 5}, "output_dir 5: not a string"),
                            ({"encoders": ["clip"]}, "encoders ['clip']: use a mapping"),
                            ({"zero_stage": 4}, "zero_stage 4: use 0, 1, 2 or 3"),
                            ({"keep_last": "3.5"}, "keep_last '3.5': not an integer")]:
        with pytest.raises(ConfigError) as caught:
            resolve_config(None, values)
        assert message in str(caught.value)
    assert resolve_config(None, {"num_threads": "auto"}).num_threads is None
    with pytest.raises(ConfigError, match="lr None: a value is required; use a number > 0"):
        TrainConfig(lr=None)


@pytest.mark.parametrize("weight", ["nan", "inf", "0", "-1"])
def test_data_weight_must_be_finite_and_positive(weight):
    with pytest.raises(ConfigError, match=rf"data 'a.json:{weight}': the weight is not a finite number > 0"):
        resolve_config(None, {"llm": "org/model", "data": [f"a.json:{weight}", "b.json:0.5"]})
    assert resolve_config(None, {"llm": "org/model", "data": ["a.json:0.5", "c:/b.json"]}).data == (
        "a.json:0.5", "c:/b.json")


# -- issue 10's raw tracebacks, as the command line reports them now ---------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["--set", "lr=[0.1"], ["--set 'lr=[0.1': the value is not valid YAML", "quote it to pass a string"]),
    (["--set", "log_every=0"], ["log_every 0: out of range; use an integer >= 1"]),
    (["--set", "lora_dropout=2"], ["lora_dropout 2: out of range; use a number in [0, 1)"]),
    (["--lora-r", "0"], ["lora_r 0: out of range; use an integer >= 1"]),
    (["--set", "num_workers=-1"], ["num_workers -1: out of range; use an integer >= 0"]),
    (["--set", "num_threads=-3"], ["num_threads -3: out of range"]),
    (["--lr", "-0.5"], ["lr -0.5: out of range; use a number > 0"]),
    (["--max-steps", "-5"], ["max_steps -5: out of range"]),
    (["--max-steps", "0"], ["max_steps 0: out of range; use an integer >= 1 (or unset: from epochs)"]),
    (["--epochs", "-3"], ["epochs -3: out of range; use a number > 0"]),
    (["--llm", "org/model", "--data", "train.json:nan"], ["data 'train.json:nan': the weight is not a finite"]),
    (["--set", "batching=paked"], ["batching 'paked': use pad, grouped or packed (did you mean 'packed'?)"]),
    (["--epochs", "-3", "--lr", "-0.5", "--lora-r", "0"], ["3 problems in the configuration:", "  - epochs -3",
                                                          "  - lr -0.5", "  - lora_r 0"]),
])
def test_bad_values_are_one_clean_error(cli, args, fragments):
    refused(cli(*args), *fragments)


def test_set_scientific_learning_rate_reaches_the_run(cli, monkeypatch):
    seen = []
    monkeypatch.setattr("mmkit.training.recipe.train", seen.append)
    result = cli("--set", "lr=1e-4", "--lr", "3e-4", "--set", "max_steps=2", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    assert seen[0].lr == 1e-4 and seen[0].max_steps == 2  # --set wins over the flag


def test_output_dir_that_is_a_file_or_not_writable(cli, tmp_path, monkeypatch):
    (tmp_path / "taken").write_text("x")
    refused(cli("--output-dir", "taken"), "output_dir taken: exists and is not a directory")
    refused(cli("--output-dir", "taken/run"), "output_dir taken/run: cannot be created: taken is not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # (root may write anywhere, so the permission is denied through the call the check makes)
    monkeypatch.setattr("mmkit.training.preflight.os.access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    refused(cli("--output-dir", locked), f"output_dir {locked}: the directory is not writable")
    refused(cli("--output-dir", locked / "run"), f"cannot be created: {locked} is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "taken"]


def test_missing_data_file_fails_before_the_model_loads(cli, tiny_llm, tmp_path):
    llm = tiny_llm()
    refused(cli("--llm", llm, "--data", "missing.json", "--data", "also.json:2", "--eval-data", "held.json"),
            "3 problems", "data: missing.json: file not found", "data: also.json: file not found",
            "eval_data: held.json: file not found")
    refused(cli("--llm", tmp_path / "nowhere", "--data", "x.json"), f"llm {tmp_path / 'nowhere'}: no such directory")


def test_broken_tokenizer_json_is_named_before_loading(cli, tiny_llm, tmp_path):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(tiny_llm(), llm)
    (llm / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "hello"},
                                                  {"from": "gpt", "value": "yes"}]}) + "\n")
    refused(cli("--llm", llm, "--data", data), f"llm {llm}: tokenizer.json is not valid JSON (line 1")


def test_config_errors_need_neither_torch_nor_a_model(tmp_path):
    """The command's path to a config error imports no torch (so it cannot have loaded a model)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from mmkit_cli.train_cmd import _train\n"
            "for options in ({'set_': ['micro_batch_size=eight']}, {'llm': 'org/m', 'data': ['missing.json']}):\n"
            "    try:\n"
            "        _train(options)\n"
            "    except Exception as exc:  # typer.Exit\n"
            "        assert exc.exit_code == 2, exc\n"
            "    else:\n"
            "        raise AssertionError('accepted')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMKIT_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "micro_batch_size 'eight'" in done.stderr and "data: missing.json: file not found" in done.stderr


def test_recipe_runs_the_preflight_before_anything_loads_or_is_written(tmp_path, monkeypatch, tiny_llm):
    from mmkit.training import recipe

    def no_model(*_a, **_k):
        raise AssertionError("reached past the preflight")

    monkeypatch.setattr(recipe, "assemble", no_model)
    monkeypatch.setattr(recipe, "init_distributed", no_model)
    out = tmp_path / "run"
    cfg = resolve_config(None, {"llm": str(tiny_llm()), "data": [str(tmp_path / "gone.jsonl")], "output_dir": str(out),
                                "modalities": ["nope"]})
    with pytest.raises(ConfigProblems) as caught:
        recipe.train(cfg)
    assert [name for name, _ in caught.value.problems] == ["modalities", "data"]
    assert "modalities: 'nope' is not installed" in str(caught.value)
    assert not out.exists()


def test_unreadable_data_is_a_data_error_before_the_model_loads(tmp_path, mm_host, tiny_llm):
    from mmkit.training.preflight import preflight

    data = tmp_path / "notes.json"
    data.write_text(json.dumps([{"text": "no conversations here"}]))
    cfg = resolve_config(None, {"llm": str(tiny_llm()), "data": [str(data)], "modalities": ["image"],
                                "output_dir": str(tmp_path / "out")})
    with pytest.raises(DataError, match="no reader recognises this file"):
        preflight(cfg, mm_host)


def test_components_readers_and_batch_geometry(tmp_path, mm_host):
    from mmkit.training.preflight import preflight

    cfg = resolve_config(None, {"modalities": ["image"], "encoders": {"image": "pointnet2", "imgae": "clip"},
                                "projectors": {"image": "mlpp"}, "data_format": "lava",
                                "global_batch_size": 48, "micro_batch_size": 32, "output_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigProblems) as caught:
        preflight(cfg, mm_host, world_size=1)
    text = str(caught.value)
    for fragment in ("encoders.imgae: 'imgae' is not an installed modality", "(did you mean 'image'?)",
                     "encoders.image: 'pointnet2' encodes pointcloud, not image",
                     "projectors.image: no projector named 'mlpp'", "(did you mean 'mlp'?)",
                     "data_format 'lava': no such reader", "(did you mean 'llava'?)",
                     "global_batch_size 48 is not a multiple of micro_batch_size 32"):
        assert fragment in text


def test_template_file_or_name_is_checked_before_loading(tmp_path):
    from mmkit.training.preflight import _template, library_template_names

    def problems(template):
        found = []
        _template(TrainConfig(template=template), found)
        return found

    good = tmp_path / "chat.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert problems(str(good)) == [] and problems(None) == []
    [(field, message)] = problems(str(tmp_path / "absent.jinja"))
    assert field == "template" and "absent.jinja" in message
    names = library_template_names()
    if names:  # the template library (when this install has one): names resolve, typos are refused by name
        assert problems(names[0]) == []
        [(field, message)] = problems(names[0] + "x")
        assert field == "template" and names[0] in message


# -- keys -----------------------------------------------------------------------------------------
def test_unknown_keys_get_a_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option 'micro_batchsize' \(did you mean 'micro_batch_size'\?\)"):
        resolve_config(None, {"micro_batchsize": 4})
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nlora_rank: 8\n")
    with pytest.raises(ConfigProblems) as caught:
        resolve_config(path, {"zzz": 1})
    text = str(caught.value)
    assert f"unknown option 'learning_rate' in {path}" in text and "unknown option 'zzz' (" not in text
    assert f"unknown option 'lora_rank' in {path} (did you mean 'lora_r'?)" in text
    assert "unknown option 'zzz'" in text


def test_dotted_set_reaches_nested_options(cli, tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("encoder_options:\n  image: {pretrained_size: 224}\n  pointcloud: {points: 1024}\n")
    overrides = parse_assignments(["encoder_options.image.feature_layer=-2", "projector_options.image.depth=2",
                                   "encoders.image=clip"])
    cfg = resolve_config(path, overrides)
    assert cfg.encoder_options == {"image": {"pretrained_size": 224, "feature_layer": -2},
                                   "pointcloud": {"points": 1024}}
    assert cfg.projector_options == {"image": {"depth": 2}} and cfg.encoders == {"image": "clip"}
    path.write_text(path.read_text() + "projector_options.image.depth: 3\n")  # dotted keys in YAML too
    assert resolve_config(path, {}).projector_options == {"image": {"depth": 3}}
    with pytest.raises(ConfigError, match=r"lr is 0.001, not a mapping"):
        resolve_config(None, {"lr": 1e-3, **parse_assignments(["lr.x=1"])})
    with pytest.raises(ConfigError, match=r"unknown option 'encoder_option' \(did you mean 'encoder_options'\?\)"):
        resolve_config(None, parse_assignments(["encoder_option.image.x=1"]))
    seen = []
    monkeypatch.setattr("mmkit.training.recipe.train", seen.append)
    result = cli("--config", path, "--set", "encoder_options.image.feature_layer=-2", "--output-dir", "o")
    assert result.exit_code == 0, result.output
    assert seen[0].encoder_options["image"] == {"pretrained_size": 224, "feature_layer": -2}


# -- declarations ---------------------------------------------------------------------------------
def test_every_field_declares_help_and_a_resume_rule():
    missing = [f.name for f in attrs.fields(TrainConfig)
               if f.metadata.get("resume") not in RESUME_RULES or not f.metadata.get("help")]
    assert not missing, f"TrainConfig fields without a help text or resume rule (use option(...)): {missing}"


def test_resume_lists_derive_from_the_fields():
    from mmkit.training.checkpoint import compat

    assert compat.RESUME_STRICT == fields_with_rule(MUST_MATCH)
    assert compat.RESUME_QUIET == fields_with_rule(IGNORED)
    assert compat.RESUME_REPORTED == fields_with_rule("may_change")
    names = [name for rule in RESUME_RULES for name in fields_with_rule(rule)]
    assert sorted(names) == sorted(f.name for f in attrs.fields(TrainConfig))  # each field in exactly one
    assert {"lr", "weight_decay", "cache_features"} <= set(fields_with_rule("may_change"))
    assert {"llm", "data", "seed", "template", "max_length"} <= set(compat.RESUME_STRICT)


def test_cli_options_derive_from_the_fields():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    train_cmd.register(app)
    command = typer.main.get_command(app).commands["train"]
    options = {opt: param for param in command.params for opt in param.opts}
    for field in attrs.fields(TrainConfig):
        flag = field.metadata.get("flag")
        if flag:
            name = "--" + (flag if isinstance(flag, str) else field.name.replace("_", "-"))
            assert name in options, name
            assert options[name].help.startswith(field.metadata["help"])
    assert "--template" in options and "--set" in options and "--config" in options
    assert "Accepts an integer >= 1" in options["--micro-batch-size"].help
    assert "(default 8; demo 32)" in options["--micro-batch-size"].help
    # the accepted values name the rule between fields, not only the field's own lower bound
    assert options["--pack-max-tokens"].help.endswith("Accepts an integer >= max_length (or unset: 2 x max_length).")


def test_saved_config_reloads_to_the_same_config(tmp_path):
    """The launcher's workers and resumed runs read the saved YAML back."""
    cfg = resolve_config(None, {"llm": "org/model", "data": ["a.json:0.5"], "lr": "2e-4", "num_threads": "auto",
                                "encoder_options": {"image": {"feature_layer": -2}}, "collective_timeout_s": 1e-3})
    save_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml", {}) == cfg


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigProblems, match="keep_last 0: out of range"):
        TrainConfig(keep_last=0)
    assert TrainConfig(lr="2e-4", modalities="image, pointcloud").modalities == ("image", "pointcloud")


# -- one real run ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_yaml_lr_2e4_trains(tmp_path, mm_host, tiny_llm, input_files, monkeypatch):
    from mmkit_cli.main import _register_commands, app  # the real command

    import shutil

    for i in range(3):
        shutil.copy(input_files["image"][i], tmp_path / f"img{i}.png")
    records = [{"id": f"r{i}", "image": f"img{i % 3}.png",
                "conversations": [{"from": "human", "value": "<image> What digit is shown ?"},
                                  {"from": "gpt", "value": str(i % 3)}]} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "run.yaml"
    config.write_text(f"llm: {tiny_llm()}\ndata: [{data}]\nmodalities: image\nlr: 2e-4\nprojector_lr: 1e-3\n"
                      f"max_steps: 2\nmicro_batch_size: 2\nlora_r: 4\nmax_length: 64\ntensorboard: false\n"
                      f"log_every: 1\noutput_dir: {tmp_path / 'run'}\n")
    monkeypatch.setenv("COLUMNS", "200")
    _register_commands()
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 2e-4 and saved["projector_lr"] == 1e-3
    assert (tmp_path / "run" / "model" / "mmkit.json").is_file()
