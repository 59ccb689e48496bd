"""Config errors name the key, and the `ray-ssl shards` CLI writes, inspects and reports bad input
as one line with exit code 2."""

from __future__ import annotations

import pytest

from ray_ssl.cli import EXIT_BAD_INPUT, main
from ray_ssl.config import ConfigError, load_config


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.batch_sise=32"], "data.batch_sise"),  # unknown key
        (["nosuchsection.x=1"], "nosuchsection"),
        (["data.batch_size=lots"], "data.batch_size"),  # bad type
        (["views.mask=random"], "views.mask"),  # bad literal
        (["data.batch_size=30", "train.num_workers=4"], "data.batch_size"),  # not divisible
        (["train.zero_stage=4"], "train.zero_stage"),
        (["views.global_size=30"], "views.global_size"),  # 30 is not a multiple of patch 4
        (["views.local_size=18"], "views.local_size"),
        (["views.mask_ratio=[0.7, 0.2]"], "views.mask_ratio"),
        (["train.num_workers=2", "train.min_workers=3"], "train.min_workers"),
        # an elastic run of 1..4 workers may have 3: 64 does not divide; 12 would
        (["data.batch_size=64", "train.num_workers=4", "train.min_workers=1"], "divides by all"),
        (["train.precision=fp16", "train.zero_stage=0"], "train.zero_stage"),
        (["curation.init_points_per_cluster=-1"], "curation.init_points_per_cluster"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("local", overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_valid_overrides_apply():
    config = load_config(
        "local", ["data.batch_size=32", "views.mask=block", "data.reader=ray_webdataset"]
    )
    assert (config.data.batch_size, config.views.mask, config.data.reader) == (
        32,
        "block",
        "ray_webdataset",
    )


def test_cli_shards_write_and_inspect(tmp_path, capsys):
    out = str(tmp_path / "digits")
    main(
        [
            "shards",
            "write",
            "--source",
            "digits",
            "--split",
            "test",
            "--out",
            out,
            "--samples-per-shard",
            "100",
        ]
    )
    assert "wrote 359 samples in 4 shards" in capsys.readouterr().out
    main(["shards", "inspect", out])
    printed = capsys.readouterr().out
    assert "359 samples in 4 shards" in printed and "verified" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["shards", "write", "--source", "folder:/no/such/dir", "--out", "{tmp}/x"],
            "does not exist",
        ),
        (
            ["shards", "write", "--source", "digits", "--split", "val", "--out", "{tmp}/x"],
            "shards.split",
        ),
        (["shards", "inspect", "{tmp}/empty"], "no shard set at"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray-ssl: error:") and message in err[0]


@pytest.mark.parametrize("override", ["train.epochs=[1,", "views.global_scale={a: 1", "x.y=: :"])
def test_yaml_syntax_error_in_an_override_is_one_line(capsys, override):
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config("local", [override])
    assert override in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", override])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "not valid YAML" in err_lines[0]


def test_yaml_syntax_error_in_a_preset_file_is_one_line(tmp_path, capsys):
    preset = tmp_path / "broken.yaml"
    preset.write_text("data:\n  batch_size: [64,\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="broken.yaml") as err:
        load_config(str(preset))
    assert "line 4" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", str(preset)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_overrides_after_options_are_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from another directory: a relative --out lands here
    main(["shards", "write", "--source", "digits", "--split", "test", "shards.samples_per_shard=50",
          "--out", "digits", "shards.seed=3", "storage.connect_retries=2"])  # fmt: skip
    assert "wrote 359 samples in 8 shards" in capsys.readouterr().out
    main(["shards", "inspect", "digits", "--preset", "local", "storage.connect_retries=2"])
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "train.epochs=1", "--preset", "local", "data.batch_sise=8"],
        ["curate", "train.epochs=1", "--preset", "curate_local", "data.batch_sise=8"],
        ["tune", "train.epochs=1", "--param", "train.seed=grid:0,1", "data.batch_sise=8"],
        ["shards", "inspect", "{tmp}", "--preset", "local", "data.batch_sise=8"],
        ["shards", "write", "--source", "digits", "--out", "{tmp}", "data.batch_sise=8"],
        ["eval", "data.batch_sise=8", "--data", "{tmp}", "--eval-data", "{tmp}", "{tmp}/export"],
        ["rasa", "{tmp}/export", "--data", "{tmp}", "data.batch_sise=8", "--eval-data", "{tmp}"],
    ],
)
def test_every_subcommand_takes_overrides_anywhere(tmp_path, capsys, argv):
    """The misspelt key reaches the config (one-line ConfigError naming it), not argparse."""
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.batch_sise" in err[0] and "unrecognized" not in err[0]


def test_an_option_value_shaped_like_an_override_stays_the_value():
    from ray_ssl.cli import build_parser, parse_with_overrides

    argv = ["rasa", "e", "--data", "s3://b/a.b=1", "x.y=2", "--eval-data", "t"]
    args = parse_with_overrides(build_parser(), argv)
    assert (args.export, args.data, args.eval_data, args.overrides) == (
        "e",
        "s3://b/a.b=1",
        "t",
        ["x.y=2"],
    )


def test_stray_arguments_are_still_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "train.epochs=1", "--preset", "local", "stray"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'stray' must look like section.key=value" in err[0]
