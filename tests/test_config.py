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
