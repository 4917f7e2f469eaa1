"""Issue 16: under a tight budget the embedding table need not be resident (a token needs one row).
`--embed-rows disk` reads the rows of a forward's tokens from the store's backbone file (store/rows.py): the same
tokens as the resident table, resident_weight_bytes smaller by exactly the table's bytes."""

from __future__ import annotations

import pytest
import torch

from tests import tiny

IDS = [5, 9, 5, 17, 33, 2, 40, 9, 11, 63]  # repeats: a prefill reads each distinct row once


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from moe_offload.cli import main

    root = tmp_path_factory.mktemp("embed")
    out = {}
    for spec in ("mixtral_gqa", "qwen3_moe_gqa_dense", "mixtral_mha_swa_tied"):
        hf = tiny.make_checkpoint(root / spec, spec, dtype="bfloat16")
        assert main(["convert", "--model", str(hf), "--out", str(root / f"{spec}-store"), "--quiet"]) == 0
        out[spec] = root / f"{spec}-store"
    return out


def _run(path, **kw):
    from moe_offload.runtime.load import load

    engine = load(path, device="cpu", memory="60%", **kw)
    r = engine.generate(prompt_ids=IDS, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    return engine, r


@pytest.mark.parametrize("spec", ["mixtral_gqa", "qwen3_moe_gqa_dense"])
def test_rows_on_demand_give_the_resident_tokens_and_leave_the_table_out_of_the_budget(stores, spec):
    from moe_offload.store.rows import DiskEmbedding

    res, a = _run(stores[spec])
    disk, b = _run(stores[spec], embed_rows="disk")
    emb = disk.model.model.embed_tokens
    assert isinstance(emb, DiskEmbedding) and disk.info["embed_rows"] == "disk"
    assert res.info["embed_rows"] == "resident"
    table = res.model.model.embed_tokens.weight
    assert emb.table_bytes == table.nbytes > 0
    assert a.token_ids == b.token_ids
    assert res.info["backbone_bytes"] - disk.info["backbone_bytes"] == table.nbytes
    assert a.stats["resident_weight_bytes"] - b.stats["resident_weight_bytes"] == table.nbytes
    assert not any("embed_tokens" in k for k in disk.model.state_dict())
    with open("/proc/self/maps") as f:  # positioned reads, never a mapping (mapped pages would count as RSS)
        assert str(stores[spec] / "backbone.safetensors") not in f.read()
    rows = emb(torch.tensor([IDS, IDS[::-1]]))  # [B, T, D], bit-equal to the table's rows
    assert rows.shape == (2, len(IDS), table.shape[1]) and rows.dtype == table.dtype
    assert torch.equal(rows, table[torch.tensor([IDS, IDS[::-1]])])


def test_rows_cast_to_the_compute_dtype_like_the_table(stores):
    from moe_offload.runtime.load import load

    res = load(stores["mixtral_gqa"], device="cpu", dtype="float32", memory="100%")
    disk = load(stores["mixtral_gqa"], device="cpu", dtype="float32", memory="100%", embed_rows="disk")
    t = torch.tensor([IDS])
    assert torch.equal(disk.model.embed(t), res.model.embed(t)) and disk.model.embed(t).dtype == torch.float32


def test_auto_reads_rows_only_under_a_budget_in_bytes_where_the_table_weighs(stores):
    from moe_offload.runtime.load import load

    path = stores["mixtral_gqa"]
    full = load(path, device="cpu")
    table = full.model.model.embed_tokens.weight.nbytes
    tight = full.info["backbone_bytes"] + full.info["expert_bytes"]  # the table: over 5 % of it at tiny width
    assert table > 0.05 * tight
    assert load(path, device="cpu", memory=tight, embed_rows="auto").info["embed_rows"] == "disk"
    assert load(path, device="cpu", memory=tight).info["embed_rows"] == "resident"  # default: resident
    assert load(path, device="cpu", memory=25 * table, embed_rows="auto").info["embed_rows"] == "resident"
    assert load(path, device="cpu", memory="60%", embed_rows="auto").info["embed_rows"] == "resident"


def test_a_tied_table_stays_resident_auto_silently_disk_refused_in_one_line(stores, capsys):
    from moe_offload.cli import main
    from moe_offload.errors import UsageError
    from moe_offload.runtime.load import load

    path = stores["mixtral_mha_swa_tied"]
    assert load(path, device="cpu", memory=10**9, embed_rows="auto").info["embed_rows"] == "resident"
    with pytest.raises(UsageError, match="tied to lm_head"):
        load(path, device="cpu", embed_rows="disk")
    assert main(["generate", "--model", str(path), "--prompt-ids", "5,6,7", "-n", "2",
                 "--embed-rows", "disk"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tie_word_embeddings" in err[0] and "Traceback" not in err[0]


def test_the_cli_flag_runs_and_a_bad_value_is_one_line(stores, capsys):
    from moe_offload.cli import main

    path = str(stores["mixtral_gqa"])
    assert main(["generate", "--model", path, "--prompt-ids", "5,6,7", "-n", "3", "--memory", "60%",
                 "--embed-rows", "disk", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", path, "--prompt-ids", "5", "--embed-rows", "mmap"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--embed-rows" in err[0]


def test_the_library_refuses_an_unknown_mode_in_one_line():
    from moe_offload.errors import UsageError
    from moe_offload.runtime.load import OffloadConfig

    with pytest.raises(UsageError, match="--embed-rows must be one of resident, auto, disk"):
        OffloadConfig.parse(torch.device("cpu"), None, embed_rows="mmap")


def test_a_table_stored_quantized_or_not_as_floats_stays_resident():
    from moe_offload.errors import UsageError
    from moe_offload.store.rows import KEY, choose, why_resident

    class Source:  # SafetensorsFolder's surface that why_resident reads
        def __init__(self, dtypes):
            self.dtypes, self.key_to_shard = dtypes, dict.fromkeys(dtypes, "backbone.safetensors")

        def keys(self):
            return list(self.dtypes)

        def dtype_of(self, name):
            return self.dtypes[name]

    quantized = Source({"model.embed_tokens.qweight": "U8", "model.embed_tokens.qsz": "BF16"})
    codes = Source({KEY: "I8"})
    for src, said in ((quantized, "stored quantized"), (codes, "stored as I8")):
        why = why_resident(src, tied=False)
        assert said in why
        assert choose("auto", 10**6, 10**6, why) is False
        with pytest.raises(UsageError, match=f"--embed-rows disk: .*{said}"):
            choose("disk", 10**6, 10**6, why)
    assert why_resident(Source({KEY: "BF16"}), tied=False) is None
    assert choose("auto", 100 * 10**6, 10**6, None) is False  # 1 % of the budget: the table stays
    assert choose("auto", 10 * 10**6, 10**6, None) is True  # 10 %
    assert choose("resident", 10**6, 10**6, None) is False


def test_an_hf_folder_stays_resident_unless_rows_are_asked_for(stores, tmp_path, monkeypatch):
    """resident / auto without a budget change nothing on an HF folder (no store is made for them); disk reads
    the rows from the store the folder converts into, like every offload option."""
    from moe_offload.runtime.load import load

    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))  # the converted store: not in ~/.cache
    hf = stores["mixtral_gqa"].parent / "mixtral_gqa"
    for mode in ("resident", "auto"):
        assert load(hf, device="cpu", embed_rows=mode).info["format"] == "hf"
    e = load(hf, device="cpu", embed_rows="disk")
    assert e.info["format"] == "store" and e.info["embed_rows"] == "disk"


def test_a_budget_only_rows_on_demand_can_meet_says_so_and_runs_with_them(stores):
    """--memory between the floor without the table and the floor with it: the refusal names --embed-rows disk
    and its floor (one line), and with --embed-rows disk the same budget runs."""
    from moe_offload.errors import MoeError
    from moe_offload.runtime.load import load
    from moe_offload.store.cache import footprints
    from moe_offload.store.format import open_store
    from moe_offload.store.open import mib  # the refusal's own formatting

    path = stores["mixtral_gqa"]
    store = open_store(path)
    full = load(path, device="cpu")
    table = full.model.model.embed_tokens.weight.nbytes
    per = max(f.load for f in footprints(store, torch.device("cpu"), full.dtype).values())
    need = full.info["backbone_bytes"] + store.top_k * per  # store/open.min_memory on a CPU, no -c
    del full
    memory = need - table // 2
    with pytest.raises(MoeError) as e:
        load(path, device="cpu", memory=memory)
    msg = str(e.value)
    assert "\n" not in msg and "--embed-rows disk" in msg and f"{mib(need - table)} is enough" in msg
    engine = load(path, device="cpu", memory=memory, embed_rows="disk")
    r = engine.generate(prompt_ids=IDS, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(r.token_ids) >= 4 and r.stats["resident_weight_bytes"] <= memory
    with pytest.raises(MoeError) as e:  # below even that floor: no hint
        load(path, device="cpu", memory=need - table - 1)
    assert "--embed-rows" not in str(e.value)
