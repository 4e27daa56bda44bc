"""FSDP2 under torchrun, on CPU with gloo: two ranks train like one process with the same global batch,
only rank 0 reads the checkpoint (rank 1 fills its shards from rank 0's broadcast; tied embeddings stay
tied), sharded checkpoints resume (on 2 ranks and on 1), the consolidated export is the trained model,
and dpo, ppo and grpo complete. The torchrun runs launch tests/dist_worker.py (`minirlhf train` plus measurements);
each takes ~10 s on 2 cores, the whole file about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from minirlhf.batching import BatchIterator
from minirlhf.distributed import meta_copy
from minirlhf.model import Transformer
from minirlhf.stages import sft
from minirlhf.trainer import Trainer
from tests.tiny import (
    answer,
    preference_rows,
    prompt,
    prompt_rows,
    tiny_config,
    tiny_model_config,
    tiny_model_dir,
    tiny_reward_model_dir,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TORCHRUN = shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH")
PROBE = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7], [1, 2, 3, 4, 5, 6, 7, 8]])  # as in dist_worker.py

# the runs of the sft comparison: 6 steps, checkpoints at 3 and 6, global batch 8 everywhere
SFT = ["train.lr=3e-3", "train.micro_batch_size=4", "train.max_steps=6", "train.schedule=\"cosine\""]


def torchrun(nproc: int, stage: str, sets: list[str], report: Path | None = None, timeout: int = 240) -> dict:
    """Run dist_worker.py on nproc CPU ranks; returns rank 0's report (or {})."""
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(WORKER), "--stage", stage]
    for s in sets:
        cmd += ["--set", s]
    if report is not None:
        cmd += ["--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(report.read_text()) if report is not None else {}


def metric(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("dist")
    tok = tiny_tok
    tiny_model_dir(root / "policy", tok, seed=0)
    tiny_reward_model_dir(root / "rm", tok)
    sft_rows = [{"instruction": prompt(i), "input": "", "output": answer(i, i % 2 == 0)} for i in range(48)]
    return {"root": root, "tok": tok, "policy": root / "policy", "rm": root / "rm",
            "sft": write_jsonl(root / "sft.jsonl", sft_rows),
            "pref": write_jsonl(root / "pref.jsonl", preference_rows(16)),
            "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(16))}


def base_sets(tiny, data: Path, out: Path) -> list[str]:
    """tiny_config's settings as --set strings for the worker."""
    return [f"model.path={tiny['policy']}", f"data.train_files=[{json.dumps(str(data))}]",
            f"train.output_dir={out}", "train.lr=3e-3", "train.micro_batch_size=4", "train.warmup_steps=0",
            "train.schedule=\"constant\"", "train.log_every=1", "train.precision=\"fp32\"", "data.cutoff_len=64",
            "data.shuffle=false"]


# --------------------------------------------------------------------------------------------------
# in-process pieces (fast)


def test_sharded_batches_partition_the_single_process_order():
    """Rank r's k-th micro-batch is micro-batch k * N + r of one process, across epoch ends (10 examples,
    batches of 3: per epoch [0,1,2] [3,4,5] [6,7,8] [9]), and every rank's sampler state stays global."""
    examples = [{"i": i} for i in range(10)]
    collate = lambda rows: [r["i"] for r in rows]
    single = BatchIterator(examples, 3, collate, seed=3)
    order = [next(single) for _ in range(12)]
    ranks = [BatchIterator(examples, 3, collate, seed=3) for _ in range(2)]
    for r, it in enumerate(ranks):
        it.shard(r, 2)
    got = [[next(it) for it in ranks] for _ in range(6)]
    assert [b for pair in got for b in pair] == order
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    assert ranks[0].batches_per_epoch == 2  # ceil(4 / 2)
    with pytest.raises(ValueError, match="rank must be in"):
        ranks[0].shard(2, 2)


def test_meta_copy_keeps_structure_and_ties_without_memory(tiny):
    model = Transformer(tiny_model_config(tiny["tok"], tie_word_embeddings=True))
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.embed_tokens.weight
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert not any(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# torchrun runs


@pytest.fixture(scope="module")
def sft_runs(tiny):
    """One process with grad_accum 2, and 2 ranks with grad_accum 1 (global batch 8 both), with
    checkpoints; then resumes from the 2-rank step-3 checkpoint on 2 ranks and on 1 (grad_accum 2)."""
    root = tiny["root"]
    single = root / "single"
    cfg = tiny_config("sft", tiny["policy"], tiny["sft"], single, *SFT, "train.grad_accum=2")
    stage = sft.build_stage(cfg)
    Trainer(cfg, stage, "cpu").fit()
    stage.model.eval()
    with torch.no_grad():
        single_logits = stage.model(PROBE)

    two = root / "two"
    sets = base_sets(tiny, tiny["sft"], two) + SFT + ["train.save_every=3"]
    report = torchrun(2, "sft", sets, root / "two.json")
    ckpt = two / "checkpoints" / "step-0000003"
    resumed2 = root / "resumed2"
    torchrun(2, "sft", base_sets(tiny, tiny["sft"], resumed2) + SFT + [f"train.resume={ckpt}"])
    resumed1 = root / "resumed1"
    torchrun(1, "sft", base_sets(tiny, tiny["sft"], resumed1) + SFT + [f"train.resume={ckpt}", "train.grad_accum=2"])
    return {"single": single, "single_logits": single_logits, "two": two, "report": report, "ckpt": ckpt,
            "resumed2": resumed2, "resumed1": resumed1}


@pytest.mark.slow
@needs_torchrun
def test_two_ranks_match_one_process_with_the_same_global_batch(sft_runs):
    """Micro-batch k*2 + r on rank r and gradients averaged over ranks make the same update as one process
    accumulating those micro-batches: losses agree to float32 reduction-order noise (rel 1e-5; measured
    equal to all printed digits)."""
    one, two = metric(sft_runs["single"]), metric(sft_runs["two"])
    assert sorted(two) == list(range(1, 7))
    print("\nsft losses, 1 process vs 2 ranks:", [(round(one[s], 6), round(two[s], 6)) for s in two])
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=1e-5), s
    assert two[6] < two[1]  # and it learns
    for s in two:
        assert metric(sft_runs["two"], "grad_norm")[s] == pytest.approx(metric(sft_runs["single"], "grad_norm")[s],
                                                                       rel=1e-4)


@pytest.mark.slow
@needs_torchrun
def test_parameters_are_sharded_one_per_rank(sft_runs):
    """Each rank holds about 1/N of the parameter bytes (sum over local shards of numel * element_size)."""
    rows = sft_runs["report"]["memory"]
    assert len(rows) == 2
    for row in rows:
        ratio = row["local_bytes"] / row["full_bytes"]
        print(f"\nrank {row['rank']}: {row['local_bytes']} of {row['full_bytes']} parameter bytes = {ratio:.4f} "
              f"(1/N = 0.5)")
        assert 0.5 <= ratio <= 0.52  # dim 0 is padded to a multiple of N, so a little over 1/N at most
    assert sum(r["local_bytes"] for r in rows) >= rows[0]["full_bytes"]


@pytest.mark.slow
@needs_torchrun
def test_only_rank0_reads_the_weights(sft_runs):
    """Rank 1 builds the model on the meta device and gets its shards broadcast from rank 0: it reads no
    byte of the checkpoint (dist_worker counts what checkpoint.read_tensors yields), rank 0 all of it
    (the fp32 tiny llama, untied: as many bytes as the parameters)."""
    rows = sft_runs["report"]["memory"]
    print(f"\nweight bytes read per rank: {[r['weight_bytes'] for r in rows]}")
    assert rows[0]["weight_bytes"] == rows[0]["full_bytes"]
    assert rows[1]["weight_bytes"] == 0


@pytest.mark.slow
@needs_torchrun
def test_sharded_checkpoint_resumes_with_the_same_losses_on_two_ranks_and_on_one(sft_runs):
    ckpt = sft_runs["ckpt"]
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "state.json", "rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"} <= names
    assert not any(n.endswith(".pt") for n in names)  # nothing pickled by minirlhf (DCP's .metadata aside)
    assert not any(p.name.startswith(".tmp") for p in ckpt.parent.iterdir())  # renamed into place
    full = metric(sft_runs["two"])
    for run in ("resumed2", "resumed1"):
        resumed = metric(sft_runs[run])
        assert sorted(resumed) == [4, 5, 6], run
        for s in resumed:  # 2 -> 2 is the same computation; 2 -> 1 re-shards through DCP (rel 1e-5)
            assert resumed[s] == pytest.approx(full[s], rel=1e-5), (run, s)


@pytest.mark.slow
@needs_torchrun
def test_consolidated_export_loads_and_gives_the_sharded_models_logits(sft_runs):
    out = sft_runs["two"]
    model = Transformer.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(PROBE)
    sharded = torch.tensor(sft_runs["report"]["logits"])
    torch.testing.assert_close(logits, sharded, atol=1e-5, rtol=1e-5)
    # and the one-process run trained the same weights (float32 noise of 6 AdamW steps)
    torch.testing.assert_close(logits, sft_runs["single_logits"], atol=1e-3, rtol=1e-3)
    assert (out / "tokenizer.model").exists() and (out / "curves.png").exists()


@pytest.mark.slow
@needs_torchrun
def test_tied_embeddings_stay_one_parameter_when_filled_from_rank0(tiny):
    """A qwen2 with tied embeddings, built on meta on rank 1 and filled from rank 0: if fully_shard or
    to_empty had split lm_head from embed_tokens, the two would get different gradients and the losses
    after step 1 would leave the one-process run's (rel 1e-5, as in the untied comparison)."""
    root = tiny["root"]
    tied = tiny_model_dir(root / "tied", tiny["tok"], seed=2, model_type="qwen2", tie_word_embeddings=True,
                          qkv_bias=True)
    steps = ["train.max_steps=3"]
    cfg = tiny_config("sft", tied, tiny["sft"], root / "tied-single", *steps, "train.grad_accum=2")
    Trainer(cfg, sft.build_stage(cfg), "cpu").fit()
    out = root / "tied-two"
    sets = base_sets(tiny, tiny["sft"], out)[1:] + [f"model.path={tied}"] + steps
    report = torchrun(2, "sft", sets, root / "tied.json")
    assert [r["weight_bytes"] > 0 for r in report["memory"]] == [True, False]
    one, two = metric(root / "tied-single"), metric(out)
    assert sorted(two) == [1, 2, 3]
    for s in two:
        assert two[s] == pytest.approx(one[s], rel=1e-5), s
    exported = Transformer.from_pretrained(out)
    assert exported.lm_head.weight is exported.embed_tokens.weight


def assert_frozen_sharded(report: dict, n_frozen: int) -> None:
    """Each rank holds about half of each frozen model's parameter bytes, and the two halves cover it;
    after training too (the frozen models' gathered weights were freed after their last forward)."""
    rows = report["memory"]
    assert [len(r["frozen"]) for r in rows] == [n_frozen] * 2
    assert [r["frozen_after"] for r in rows] == [r["frozen"] for r in rows]
    for i in range(n_frozen):
        full = rows[0]["frozen"][i][1]
        ratios = [r["frozen"][i][0] / full for r in rows]
        print(f"\nfrozen model {i}: {full} parameter bytes, held per rank {ratios} (1/N = 0.5)")
        # dim 0 is split in ceil-sized chunks, so one rank may hold a few rows more (e.g. a [1, H] head)
        assert all(0.45 <= q <= 0.55 for q in ratios)
        assert sum(r["frozen"][i][0] for r in rows) == full


@pytest.mark.slow
@needs_torchrun
def test_dpo_on_two_ranks(tiny):
    """Live reference (a frozen copy: no LoRA), sharded like the policy."""
    out = tiny["root"] / "dpo"
    report = torchrun(2, "dpo", base_sets(tiny, tiny["pref"], out) + ["train.max_steps=2", "dpo.reference=\"live\""],
                      tiny["root"] / "dpo.json")
    assert_frozen_sharded(report, 1)
    assert [r["weight_bytes"] > 0 for r in report["memory"]] == [True, False]  # policy and its copy: rank 0's
    loss = metric(out)
    # step 1: the policy is its reference, so every margin is 0 and the loss is -log sigmoid(0) = log 2
    assert loss[1] == pytest.approx(0.6931472, abs=1e-5)
    assert sorted(loss) == [1, 2]
    Transformer.from_pretrained(out)  # the exported policy loads


@pytest.mark.slow
@needs_torchrun
def test_ppo_with_lora_on_two_ranks(tiny):
    """Generation with the gathered policy, critic and a sharded reward model: completes, writes samples once (rank
    0: 4 rows per step), and starts with zero KL (adapter B = 0: the policy is its reference)."""
    out = tiny["root"] / "ppo"
    sets = base_sets(tiny, tiny["prompts"], out) + [
        f"ppo.reward_model={tiny['rm']}", "ppo.prompts_per_rollout=4", "ppo.samples_per_prompt=2",
        "ppo.minibatch_size=4", "ppo.micro_batch_size=2", "ppo.max_new_tokens=6", "ppo.log_samples_every=1",
        "lora.enabled=true", "lora.r=4", "train.max_steps=2"]
    report = torchrun(2, "ppo", sets, tiny["root"] / "ppo.json")
    assert_frozen_sharded(report, 1)  # the reward model (the reference is the policy, adapters off)
    kl = metric(out, "kl")
    assert sorted(kl) == [1, 2] and kl[1] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(v)) for v in metric(out, "loss").values())
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 4
    assert (out / "adapter_model.safetensors").exists() and (out / "critic" / "model.safetensors").exists()


@pytest.mark.slow
@needs_torchrun
def test_grpo_on_two_ranks(tiny):
    """Full fine-tuning with beta > 0 (a frozen reference copy, sharded like the policy), two passes per rollout
    and dynamic sampling (the ranks agree on the rounds): completes, starts with zero KL, writes samples once, and
    the exported policy loads."""
    out = tiny["root"] / "grpo"
    sets = base_sets(tiny, tiny["prompts"], out) + [
        'grpo.reward_functions=["minirlhf.rewards:soft_overlong_penalty"]',
        'grpo.reward_kwargs={"minirlhf.rewards:soft_overlong_penalty" = {max_length = 5, cache_length = 4}}',
        "grpo.prompts_per_rollout=2", "grpo.samples_per_prompt=2", "grpo.micro_batch_size=2", "grpo.max_new_tokens=6",
        "grpo.beta=0.1", "grpo.num_iterations=2", "grpo.dynamic_sampling=true", "grpo.max_extra_rollouts=1",
        "grpo.log_samples_every=1", "train.max_steps=2"]
    report = torchrun(2, "grpo", sets, tiny["root"] / "grpo.json")
    assert_frozen_sharded(report, 1)  # the reference copy
    kl = metric(out, "kl")
    assert sorted(kl) == [1, 2] and kl[1] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(v)) for v in metric(out, "loss").values())
    assert set(metric(out, "dynamic_sampling/extra_rollouts").values()) <= {0.0, 1.0}
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 4
    Transformer.from_pretrained(out)


def test_a_sharded_save_syncs_only_its_own_files_while_other_ranks_still_write(tmp_path, monkeypatch):
    """Rank 0 used to fsync a listing of the checkpoint folder taken while rank 1 was still writing: rank 1's
    safetensors temp file (".tmpXXXXXX") was in the listing and renamed before rank 0 opened it, so the save
    failed with "No such file or directory" (seen once in CI). Here "rank 1" leaves such a file during rank 0's
    save and renames it away before rank 0 syncs; the save completes and syncs only rank 0's files."""
    import minirlhf.checkpointing as ckpt
    from minirlhf import distributed

    class RankZero:
        rank, world_size, is_main = 0, 2, True

        def barrier(self):
            pass

    stray = {}

    def other_rank_writes(path, model, optimizer):
        stray["path"] = Path(path) / ".tmpNCxtP6"  # rank 1's rng file, half-written under its temp name
        stray["path"].write_bytes(b"partial")

    real_save_tree = ckpt.save_tree

    def save_tree_then_other_rank_renames(tree, folder, name):
        files = real_save_tree(tree, folder, name)
        if stray["path"].exists():
            stray["path"].rename(Path(folder) / "rng-1.json")  # rank 1 finishes: its temp file is renamed
        return files

    synced: list[Path] = []
    real_fsync = ckpt.fsync_files
    monkeypatch.setattr(distributed, "save_sharded", other_rank_writes)
    monkeypatch.setattr(ckpt, "save_tree", save_tree_then_other_rank_renames)
    monkeypatch.setattr(ckpt, "fsync_files", lambda files: (synced.extend(files), real_fsync(files)))
    model = torch.nn.Linear(2, 2)
    final = ckpt.save_checkpoint(tmp_path, {"step": 3}, {"python": [1, 2]}, model,
                                 torch.optim.AdamW(model.parameters()), keep_last=2, dist=RankZero())
    assert final == tmp_path / "checkpoints" / "step-0000003" and final.is_dir()
    assert sorted(p.name for p in synced) == ["rng-0.json", "state.json"]


@needs_torchrun
def test_compile_on_two_ranks(tiny):
    """[train] compile under FSDP2: the compiled blocks train the 2-rank run to the eager run's losses."""
    root = tiny["root"]
    steps = ["train.max_steps=2"]
    torchrun(2, "sft", base_sets(tiny, tiny["sft"], root / "eager2") + steps)
    # two ranks compiling at once on a loaded 2-core machine can take minutes: more than the default 240 s
    torchrun(2, "sft", base_sets(tiny, tiny["sft"], root / "compiled2") + steps + ["train.compile=true"], timeout=600)
    eager, compiled = metric(root / "eager2"), metric(root / "compiled2")
    assert len(eager) == 2 and compiled.keys() == eager.keys()
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-4)
