"""Bad inputs and faults, one table: every case runs a CLI (`python -m emo_jax.<tool>`) in a
subprocess and asserts its exit status, the one line it prints on stderr (an `error:` line, or
for a case that recovers, one warning line), that no output holds a traceback, and that no good
file changed (sha256 of every file that existed before the command, and for a failing command
no file or folder created or removed).

One trained workdir (`train_helpers.reference_run`) and one folder of inputs (data files,
subset files) are shared by every case and must stay byte-identical; a case that damages a
workdir works on its own copy. The README's table "Faults and bad inputs" lists these cases
(`test_readme_lists_every_case`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import pytest

import train_helpers as th

S, E = th.STEPS, th.EVERY  # the reference run: checkpoints E and S


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return th.reference_run(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs(reference, tmp_path_factory):
    """Read-only inputs of the cases: data files good and bad, and subset files."""
    root = tmp_path_factory.mktemp("inputs")
    lines = [json.dumps({"text": f"document {i} " + "words " * (i % 5 + 2)}) for i in range(24)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    (root / "cut.jsonl.gz").write_bytes(data[:len(data) * 2 // 3])  # truncated gzip stream
    (root / "plain.jsonl.gz").write_text(json.dumps({"text": "hello"}) + "\n")  # not gzip
    good = [json.dumps({"text": f"good document {i} " * 4}) for i in range(12)]
    (root / "bad.jsonl").write_text("\n".join(good[:6] + ["{not json", '{"body": 1}'] + good[6:])
                                    + "\n")  # two malformed records among good ones
    (root / "empty.jsonl").write_text("")
    (root / "not_json.json").write_text("not json\n")
    proc = _run(["emo_jax.select", f"--checkpoint={reference}", "--keep=3", "--method=random",
                 f"--out={root}/subset.json"])
    assert proc.returncode == 0, proc.stderr
    subset = json.loads((root / "subset.json").read_text())
    out_of_range = json.loads(json.dumps(subset))
    out_of_range["layers"][0] = [0, 99]
    (root / "out_of_range.json").write_text(json.dumps(out_of_range))
    other = json.loads(json.dumps(subset))
    other["model"]["shape"]["model.d_model"] = 48
    (root / "other_model.json").write_text(json.dumps(other))
    return str(root)


@dataclasses.dataclass
class Env:
    """Where a case runs: `root` is its own folder, `work` a copy of the reference workdir
    there (Case.copy), `ref` and `inputs` are shared and read only."""

    root: pathlib.Path
    ref: str
    inputs: str

    @property
    def work(self) -> pathlib.Path:
        return self.root / "work"

    def sub(self, text: str, escape: bool = False) -> str:
        """Fills in {root}, {work}, {ref} and {in} (escaped for a regular expression)."""
        for key, value in (("{root}", self.root), ("{work}", self.work), ("{ref}", self.ref),
                           ("{in}", self.inputs)):
            text = text.replace(key, re.escape(str(value)) if escape else str(value))
        return text


def _nothing(*_):
    pass


@dataclasses.dataclass
class Case:
    name: str  # as in the README's table
    argv: list  # python -m ARGV; {root} {work} {ref} {in} are filled in (Env.sub)
    status: int  # exit status
    line: str | None  # regex of the one non-empty stderr line (None: stderr stays empty)
    said: str  # the outcome, as the README's table says it
    setup: Callable = _nothing  # setup(env): makes the case's inputs in env.root
    copy: bool = False  # the case works on env.work, a copy of the reference workdir
    stdout: str | None = None  # regex that a line of stdout matches
    keep: tuple | None = None  # paths under root (prefixes) whose files must stay the same;
    #                            None: nothing under root may change (nothing made, nothing lost)
    check: Callable = _nothing  # check(env, proc): further assertions
    run: Callable | None = None  # run(env, argv) -> CompletedProcess (default: _run)
    marks: tuple = ()

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")


def _run(argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=th.REPO, env=th.cli_env(),
                          text=True, capture_output=True, timeout=timeout)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def train(*extra, workdir="{work}") -> list:
    return ["emo_jax.train", *th.BASE_ARGS, f"--workdir={workdir}", *extra]


def snapshot(root) -> dict:
    """{relative path: sha256 of a file, or 'dir'} of everything under root."""
    root = pathlib.Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---- setups and checks

def write(rel: str, text: str = "precious\n"):
    def setup(env):
        path = env.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return setup


def flip_newest(env):
    """XORs 8 bytes in the middle of the biggest data file of the newest checkpoint's params:
    same size, and the file still decodes (the values are wrong)."""
    files = [p for p in (env.work / "checkpoints" / str(S) / "params").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    big.write_bytes(bytes(data))


def truncate_newest(env):
    for path in (env.work / "checkpoints" / str(S) / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            with open(path, "r+b") as f:
                f.truncate(16)


def resumed_from_previous(env, proc):
    """The damaged checkpoint is set aside, steps E+1.. re-run bit for bit, and the re-saved
    checkpoint S verifies (it is the one a tool reads)."""
    aside = os.listdir(env.work / "checkpoints_unreadable")
    assert len(aside) == 1 and aside[0].startswith(f"{S}-"), aside
    assert th.losses(env.work) == th.losses(env.ref)
    from emo_jax import model_files  # pylint: disable=g-import-not-at-top

    assert model_files.restore_model(str(env.work))[2]["step"] == S


def failed_save(env, proc):
    """Stopped at a logged step before the end, with checkpoint 2 only, and that one verifies
    (its checksums): the run resumes from it."""
    workdir = env.root / "w"
    assert sorted(th.step_records(workdir))[-1] < S
    assert sorted(n for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == ["2"]
    from emo_jax import model_files  # pylint: disable=g-import-not-at-top

    assert model_files.restore_model(str(workdir), step=2)[2]["step"] == 2


def bad_records_counted(env, proc):
    warnings = [line for line in proc.stdout.splitlines() if "bad data records" in line]
    assert 1 <= len(warnings) <= 3, warnings  # rate-limited: the first, one a minute, the end
    assert any("bad records" in line for line in proc.stdout.splitlines()
               if line.startswith("step "))  # the progress line
    recs = th.step_records(env.root / "w")
    counts = [recs[s]["skipped_records"] for s in sorted(recs)]
    assert counts == sorted(counts) and counts[-1] > 0
    done = [r for r in th.records(env.root / "w") if r.get("event") == "done"][0]
    assert done["skipped_records"] >= counts[-1]


def sigterm_at_startup(env, argv) -> subprocess.CompletedProcess:
    """Starts a run, sends SIGTERM as soon as its workdir exists (long before the first step)."""
    workdir = env.root / "w"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=th.REPO, env=th.cli_env(),
                                stdout=out, stderr=err, text=True)
        deadline = time.time() + 300
        while not workdir.exists():
            assert proc.poll() is None and time.time() < deadline, "ended before the signal"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(argv, rc, out.read(), err.read())
    if "SIGTERM received: saved checkpoint" in result.stdout + result.stderr:
        pytest.skip("the run reached its first step before the signal")
    return result


ERROR_MISSING_CHECKPOINT = (r"^error: no emo_jax checkpoint at {root}/none: expected a training "
                            r"workdir")
_SLOW = (pytest.mark.slow,)  # the cases that train steps (10-30 s each on 2 busy cores)

# ---- the table

CASES = [
    # Checkpoints: damaged, unreadable, a failed save.
    Case("train: bytes flipped in the newest checkpoint", train(), 0,
         rf"checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable) \(.*\); "
         rf"moved it to {{work}}/checkpoints_unreadable/{S}-.*; resuming from step {E}$",
         "one warning line naming it; moved to `checkpoints_unreadable/`; resumes from the "
         "previous checkpoint, same losses", setup=flip_newest, copy=True,
         stdout=rf"resumed from checkpoint {E}", keep=(f"work/checkpoints/{E}",),
         check=resumed_from_previous, marks=_SLOW),
    Case("train: newest checkpoint unreadable (truncated)", train(), 0,
         rf"checkpoint {{work}}/checkpoints/{S} is unreadable \(.*\); moved it to "
         rf"{{work}}/checkpoints_unreadable/{S}-.*; resuming from step {E}$",
         "the same", setup=truncate_newest, copy=True, stdout=rf"resumed from checkpoint {E}",
         keep=(f"work/checkpoints/{E}",), check=resumed_from_previous,
         marks=_SLOW),
    Case("eval: bytes flipped in the newest checkpoint",
         ["emo_jax.eval", "--checkpoint={work}", "--data=", "--max_documents=4"], 0,
         rf"checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable) \(.*\); "
         rf"using step {E} instead$",
         "one warning line naming it and the step used; evaluates that step",
         setup=flip_newest, copy=True, stdout=r"^all: loss "),
    Case("eval --step of a checkpoint with flipped bytes",
         ["emo_jax.eval", "--checkpoint={work}", "--data=", "--max_documents=4", f"--step={S}"],
         2, rf"^error: checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable): ",
         "`error: checkpoint DIR is corrupt: checksum mismatch in ...` (or `is unreadable: "
         "...` where the flipped bytes break decoding)",
         setup=flip_newest, copy=True),
    Case("eval: newest checkpoint unreadable (truncated)",
         ["emo_jax.eval", "--checkpoint={work}", "--data=", "--max_documents=4"], 0,
         rf"checkpoint {{work}}/checkpoints/{S} is unreadable \(.*\); using step {E} instead$",
         "one warning line naming it and the step used; evaluates that step",
         setup=truncate_newest, copy=True, stdout=r"^all: loss "),
    Case("eval --step of an unreadable checkpoint",
         ["emo_jax.eval", "--checkpoint={work}", "--data=", "--max_documents=4", f"--step={S}"],
         2, rf"^error: checkpoint {{work}}/checkpoints/{S} is unreadable: ",
         "`error: checkpoint DIR is unreadable: ...`", setup=truncate_newest, copy=True),
    # The other tools on a workdir whose newest checkpoint has flipped bytes: one warning line
    # naming it and the step used (and with --step of it, or a corrupt model directory, an
    # error line, as eval above).
    Case("select: bytes flipped in the newest checkpoint",
         ["emo_jax.select", "--checkpoint={work}", "--method=random", "--keep=4",
          "--out={root}/s.json"], 0,
         rf"checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable) \(.*\); "
         rf"using step {E} instead$", "one warning line naming it and the step used",
         setup=flip_newest, copy=True, stdout=r"^kept 4 of 16 experts per layer",
         keep=("work",)),
    Case("generate: bytes flipped in the newest checkpoint",
         ["emo_jax.generate", "--checkpoint={work}", "--prompt=def f(", "--max_new_tokens=4"],
         0, rf"checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable) \(.*\);"
         rf" using step {E} instead$", "the same", setup=flip_newest, copy=True,
         stdout=r"^def f\("),
    # (extract's default, lazy path verifies the chunks it reads; --eager reads them all)
    Case("extract --eager of a checkpoint with flipped bytes",
         ["emo_jax.extract", f"--checkpoint={{work}}/checkpoints/{S}", "--eager",
          "--subset={in}/subset.json", "--out={root}/small"], 2,
         rf"^error: checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable): ",
         "`error: checkpoint DIR is corrupt: ...` (or `is unreadable: ...`); nothing written",
         setup=flip_newest, copy=True),
    Case("convert of a checkpoint with flipped bytes",
         ["emo_jax.convert", f"--checkpoint={{work}}/checkpoints/{S}", "--to_hf={root}/hf"], 2,
         rf"^error: checkpoint {{work}}/checkpoints/{S} is (corrupt|unreadable): ",
         "the same", setup=flip_newest, copy=True),
    Case("train: a checkpoint save fails (file too large, as a full disk or a quota)",
         train("--config.checkpoint.every=2", "--config.checkpoint.inject_save_failure_step=4",
               workdir="{root}/w"), 4,
         r"^error: saving checkpoint {root}/w/checkpoints/4 failed: OSError: \[Errno 27\] File "
         r"too large: .*the newest complete checkpoint is 2",
         "`error: saving checkpoint DIR failed: OSError: ...` naming the newest complete one; "
         "it stays intact (it verifies)", keep=(), check=failed_save,
         marks=_SLOW),
    # Data files.
    Case("train: malformed JSONL lines and a truncated .jsonl.gz in the training data",
         train("--config.data.train_sources={in}/cut.jsonl.gz,{in}/bad.jsonl",
               workdir="{root}/w"), 0, None,
         "skipped and counted: console lines naming the file (stdout, rate-limited), "
         "`bad records N` in the progress line, `skipped_records` in metrics.jsonl",
         stdout=r"skipped \d+ bad data records .*(cut\.jsonl\.gz|bad\.jsonl)", keep=(),
         check=bad_records_counted, marks=_SLOW),
    Case("train: truncated .jsonl.gz as training data, data.on_bad_record=error",
         train("--config.data.train_sources={in}/cut.jsonl.gz",
               "--config.data.on_bad_record=error", workdir="{root}/w"), 2,
         r"^error: bad record \(corrupt_file\) at {in}/cut\.jsonl\.gz \(record 7, line 8, .*"
         r"the gzip stream is truncated", "`error: bad record (corrupt_file) at FILE (record, "
         "line, offset...)`; no workdir left"),
    Case("train: truncated .jsonl.gz as eval data, data.on_bad_record=error",
         train("--config.data.eval_sources={in}/cut.jsonl.gz",
               "--config.data.on_bad_record=error", workdir="{root}/w"), 2,
         r"^error: bad record \(corrupt_file\) at {in}/cut\.jsonl\.gz \(record 7, line 8, .*"
         r"the gzip stream is truncated", "the same"),
    Case("train: truncated .jsonl.gz as eval data (skip policy)",
         train("--config.data.eval_sources={in}/cut.jsonl.gz", workdir="{root}/w"), 0,
         r"data\.eval_sources: skipped 1 bad records .*cut\.jsonl\.gz",
         "one warning line naming the file; the rest is evaluated", keep=(),
         marks=(pytest.mark.slow,)),
    Case("train: a .gz that is not gzip as training data",
         train("--config.data.train_sources={in}/plain.jsonl.gz", workdir="{root}/w"), 2,
         r"^error: data source '{in}/plain\.jsonl\.gz' has no valid document .*line 1, .*not "
         r"gzip data", "`error: data source FILE has no valid document (... not gzip data ...)`;"
         " no workdir left"),
    Case("train: a .gz that is not gzip as eval data",
         train("--config.data.eval_sources={in}/plain.jsonl.gz", workdir="{root}/w"), 2,
         r"^error: data source '{in}/plain\.jsonl\.gz' has no valid document .*line 1, .*not "
         r"gzip data", "the same"),
    Case("train: a data file with no document",
         train("--config.data.train_sources={in}/empty.jsonl", workdir="{root}/w"), 2,
         r"^error: data source '{in}/empty\.jsonl' has no valid document \(0 records",
         "`error: data source FILE has no valid document (0 records ...)`; no workdir left"),
    Case("train: a data path that does not exist",
         train("--config.data.train_sources={root}/no", workdir="{root}/w"), 2,
         r"^error: .*'{root}/no' does not exist", "`error: ... 'PATH' does not exist`; "
         "no workdir left"),
    Case("train: a data path that does not exist, into an existing workdir",
         train("--config.data.train_sources={root}/no", workdir="{root}/mine"), 2,
         r"^error: .*'{root}/no' does not exist",
         "the same; the existing workdir and its files are kept",
         setup=write("mine/notes.txt")),
    Case("eval: truncated .jsonl.gz as --data",
         ["emo_jax.eval", "--checkpoint={ref}", "--data={in}/cut.jsonl.gz"], 0,
         r"data source '{in}/cut\.jsonl\.gz': skipped 1 bad records .*the gzip stream is "
         r"truncated", "one warning line naming the file and the bad records skipped; "
         "evaluates the rest", stdout=r"^all: loss .* documents 7$"),
    Case("eval: a .gz that is not gzip as --data",
         ["emo_jax.eval", "--checkpoint={ref}", "--data={in}/plain.jsonl.gz"], 2,
         r"^error: data source '{in}/plain\.jsonl\.gz' holds no valid document .*not gzip data",
         "`error: data source FILE holds no valid document (... not gzip data ...)`"),
    Case("eval: --data file that does not exist",
         ["emo_jax.eval", "--checkpoint={ref}", "--data={root}/missing.jsonl"], 2,
         r"^error: data source '{root}/missing\.jsonl' does not exist",
         "`error: data source 'FILE' does not exist`"),
    # Workdirs and interruptions.
    Case("train: --workdir is an existing file", train(workdir="{root}/a_file"), 2,
         r"^error: workdir '{root}/a_file' is a file", "`error: workdir 'PATH' is a file, ...`;"
         " the file is kept", setup=write("a_file")),
    Case("train: --workdir under a file", train(workdir="{root}/a_file/sub"), 2,
         r"^error: workdir '{root}/a_file/sub' cannot be created",
         "`error: workdir 'PATH' cannot be created: ...`", setup=write("a_file")),
    Case("train: SIGTERM during startup", train(workdir="{root}/w"), 143,
         r"^error: SIGTERM received before the first training step: stopped; nothing was saved;"
         r" removed the workdir {root}/w that it had created$",
         "`error: SIGTERM received before the first training step: stopped; nothing was saved; "
         "removed the workdir ...`, exit 143; no workdir left", run=sigterm_at_startup),
    Case("train: a workdir of another model shape", train("--config.model.d_model=48"), 2,
         r"^error: .*another shape.*model\.d_model=64 there but 48 here.*params/blocks/attn/wq "
         r"is \(2, 64, 4, 16\) there but \(2, 48, 4, 16\) here",
         "`error:` the checkpoint is of another shape, naming the config keys and arrays that "
         "differ; the workdir is unchanged", copy=True),
    Case("train: --init_checkpoint that does not exist",
         train("--init_checkpoint={root}/none", workdir="{root}/w"), 2, ERROR_MISSING_CHECKPOINT,
         "`error: no emo_jax checkpoint at PATH: expected a training workdir ...`; no workdir "
         "left"),
    # Config.
    Case("train: unknown config key", train("--config.train.stepz=3", workdir="{root}/w"), 2,
         r"^error: unknown config key 'train\.stepz' \(from --config\.train\.stepz\); valid keys "
         r"of 'train': .*steps", "`error: unknown config key 'KEY' ...; valid keys of 'SECTION':"
         " ...`; no workdir left"),
    Case("train: unknown config section", train("--config.nosuch.key=1", workdir="{root}/w"), 2,
         r"^error: unknown config key 'nosuch\.key' .*valid keys of 'config': ",
         "the same"),
    Case("train: config value of the wrong type",
         train("--config.train.steps=abc", workdir="{root}/w"), 2,
         r"^error: flag --config\.train\.steps=abc: ", "`error: flag --config.KEY=VALUE: ...`"),
    Case("train: config value not among the valid ones",
         train("--config.moe.pool=weird", workdir="{root}/w"), 2,
         r"^error: config key 'moe\.pool' is 'weird'; valid: document, none",
         "`error: config key 'KEY' is VALUE; valid: ...`"),
    Case("train: config value out of range", train("--config.train.lr=-1.0", workdir="{root}/w"),
         2, r"^error: config key 'train\.lr' is -1\.0", "the same"),
    Case("train: moe.top_k larger than the routed experts",
         train("--config.moe.top_k=99", workdir="{root}/w"), 2,
         r"^error: moe\.top_k \(99\) must be <= the routed experts \(15 = ",
         "`error: moe.top_k (K) must be <= the routed experts (...)`"),
    Case("train: --config file that does not exist",
         train("--config={root}/missing.py", workdir="{root}/w"), 2,
         r"^error: config file '{root}/missing\.py' does not exist",
         "`error: config file 'PATH' does not exist`"),
    Case("train: config file with a syntax error",
         train("--config={root}/bad_config.py", workdir="{root}/w"), 2,
         r"^error: config file {root}/bad_config\.py line 1: syntax error",
         "`error: config file PATH line N: syntax error: ...`",
         setup=write("bad_config.py", "def get_config(:\n")),
    Case("train: a tokenizer file that does not exist",
         train("--config.data.tokenizer=sentencepiece:{root}/missing.model", workdir="{root}/w"),
         2, r"^error: data\.tokenizer: the SentencePiece model '{root}/missing\.model' does not "
         r"exist", "`error: data.tokenizer: ... 'PATH' does not exist`"),
    # Outputs that exist.
    Case("select --out=EXISTING_FILE",
         ["emo_jax.select", "--checkpoint={ref}", "--text=hi", "--keep=3",
          "--out={root}/subset.json"], 2,
         r"^error: --out={root}/subset\.json exists; pass --overwrite to replace it",
         "`error: --out=FILE exists; pass --overwrite ...`; the file is kept",
         setup=write("subset.json")),
    Case("select --out=EXISTING_FILE --overwrite (the refusal is lifted)",
         ["emo_jax.select", "--checkpoint={root}/none", "--text=hi", "--keep=3",
          "--out={root}/subset.json", "--overwrite"], 2, ERROR_MISSING_CHECKPOINT,
         "no refusal: here the run then stops on its missing checkpoint, and the file is kept",
         setup=write("subset.json")),
    Case("select --compose --out=A_DIRECTORY",
         ["emo_jax.select", "--compose", "{in}/subset.json", "{in}/subset.json",
          "--out={root}/dir"], 2, r"^error: --out={root}/dir is a directory; give a file name",
         "`error: --out=DIR is a directory; give a file name`", setup=write("dir/x")),
    Case("eval --out=EXISTING_FILE",
         ["emo_jax.eval", "--checkpoint={ref}", "--data=", "--out={root}/result.json"], 2,
         r"^error: --out={root}/result\.json exists; pass --overwrite",
         "`error: --out=FILE exists; pass --overwrite ...`", setup=write("result.json")),
    Case("analyze --out=EXISTING_DIRECTORY",
         ["emo_jax.analyze", "--checkpoint={ref}", "--data={in}/bad.jsonl",
          "--out={root}/analysis"], 2, r"^error: --out={root}/analysis exists; pass --overwrite",
         "`error: --out=DIR exists; pass --overwrite ...`; its files are kept",
         setup=write("analysis/report.md")),
    Case("analyze --out=A_FILE",
         ["emo_jax.analyze", "--checkpoint={ref}", "--data={in}/bad.jsonl",
          "--out={root}/a_file"], 2, r"^error: --out={root}/a_file is a file; give a directory",
         "`error: --out=PATH is a file; give a directory ...`", setup=write("a_file")),
    Case("extract --out=EXISTING_DIRECTORY",
         ["emo_jax.extract", "--checkpoint={ref}", "--subset={in}/subset.json",
          "--out={root}/model"], 2, r"^error: --out={root}/model exists; choose a new directory",
         "`error: --out=DIR exists; choose a new directory`", setup=write("model/x")),
    Case("convert --to_hf=EXISTING_NON_EMPTY_DIRECTORY",
         ["emo_jax.convert", "--checkpoint={ref}", "--to_hf={root}/hf"], 2,
         r"^error: {root}/hf already exists; choose a new output directory",
         "`error: DIR already exists; choose a new output directory (nothing is overwritten)`",
         setup=write("hf/keep.txt")),
    # Checkpoints that do not exist.
    *[Case(f"{tool} --checkpoint that does not exist",
           [f"emo_jax.{tool}", "--checkpoint={root}/none", *extra], 2, ERROR_MISSING_CHECKPOINT,
           "`error: no emo_jax checkpoint at PATH: expected a training workdir ...`")
      for tool, extra in (("eval", ["--data="]), ("select", ["--text=hi", "--keep=3",
                                                              "--out={root}/s.json"]),
                          ("extract", ["--subset={in}/subset.json", "--out={root}/model"]),
                          ("convert", ["--to_hf={root}/hf"]),
                          ("generate", ["--prompt=hi"]))],
    Case("compose --base that does not exist",
         ["emo_jax.compose", "--base={root}/none", "--take={ref}:{in}/subset.json",
          "--out={root}/model"], 2, r"^error: checkpoint {root}/none does not exist",
         "`error: checkpoint PATH does not exist`"),
    # Subset files.
    Case("extract --subset that is not JSON",
         ["emo_jax.extract", "--checkpoint={ref}", "--subset={in}/not_json.json",
          "--out={root}/model"], 2,
         r"^error: subset file '{in}/not_json\.json' is not valid JSON",
         "`error: subset file 'FILE' is not valid JSON (...)`"),
    Case("extract --subset naming an expert out of range",
         ["emo_jax.extract", "--checkpoint={ref}", "--subset={in}/out_of_range.json",
          "--out={root}/model"], 2,
         r"^error: subset file '{in}/out_of_range\.json' is not a valid subset file: layer 0: "
         r"ids must be ascending, distinct and in \[0, 15\)",
         "`error: subset file 'FILE' is not a valid subset file: layer L: ids must be ... in "
         "[0, R)`"),
    Case("eval --subset of another model",
         ["emo_jax.eval", "--checkpoint={ref}", "--data=", "--subset={in}/other_model.json"], 2,
         r"^error: subset file '{in}/other_model\.json' was chosen for another model "
         r"\(model\.d_model=48 there but 64 here\)",
         "`error: subset file 'FILE' was chosen for another model (KEY=A there but B here)`"),
    # Flags.
    Case("generate with an empty prompt",
         ["emo_jax.generate", "--checkpoint={ref}", "--prompt="], 2,
         r"^error: --prompt is empty", "`error: --prompt is empty: give text to continue`"),
    Case("generate --max_new_tokens=0",
         ["emo_jax.generate", "--checkpoint={ref}", "--prompt=hi", "--max_new_tokens=0"], 2,
         r"^error: --max_new_tokens=0: it must be >= 1", "`error: --max_new_tokens=0: it must be"
         " >= 1`"),
    Case("generate --subset_from_prompt=K beyond the experts",
         ["emo_jax.generate", "--checkpoint={ref}", "--prompt=hi", "--subset_from_prompt=99"],
         2, r"^error: K=99 \(--subset_from_prompt\) is not valid for this model: .*2 <= K <= 16",
         "`error: K=99 (--subset_from_prompt) is not valid for this model: ... 2 <= K <= 16`"),
    Case("select --method that does not exist",
         ["emo_jax.select", "--checkpoint={ref}", "--text=hi", "--keep=3", "--method=magic",
          "--out={root}/s.json"], 2,
         r"^error: flag --method=magic: value should be one of <layerwise\|global",
         "`error: flag --method=magic: value should be one of <...>`"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, reference, inputs, tmp_path):
    env = Env(root=tmp_path, ref=reference, inputs=inputs)
    if case.copy:
        shutil.copytree(reference, env.work)
    case.setup(env)
    shared = {"ref": snapshot(reference), "inputs": snapshot(inputs)}
    before = snapshot(tmp_path)
    argv = [env.sub(a) for a in case.argv]
    proc = (case.run or (lambda _, a: _run(a)))(env, argv)
    report = f"{case.name}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, report
    assert proc.returncode == case.status, report
    err = _lines(proc.stderr)
    if case.line is None:
        assert not err, report
    else:
        assert len(err) == 1, report
        assert re.search(env.sub(case.line, escape=True), err[0]), report
        assert err[0].startswith("error: ") == (case.status != 0), report
    if case.stdout:
        assert any(re.search(env.sub(case.stdout, escape=True), line)
                   for line in _lines(proc.stdout)), report
    after = snapshot(tmp_path)
    if case.keep is None:  # nothing made, nothing lost, nothing changed
        assert after == before, report
    else:
        for rel, digest in before.items():
            if any(rel == k or rel.startswith(k + "/") for k in case.keep):
                assert after.get(rel) == digest, (rel, report)
    assert {"ref": snapshot(reference), "inputs": snapshot(inputs)} == shared, report
    case.check(env, proc)


def test_readme_lists_every_case():
    with open(os.path.join(th.REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    missing = [f"| {c.name} | {c.status} | {c.said} |" for c in CASES
               if f"| {c.name} | {c.status} | {c.said} |" not in readme]
    assert not missing, "README.md lacks these rows:\n" + "\n".join(missing)


def test_atomic_writers_leave_old_results_on_failure(tmp_path):
    from emo_jax.cli import directory_written_atomically, write_text_atomically

    path = tmp_path / "f.json"
    write_text_atomically(str(path), "one")
    write_text_atomically(str(path), "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.json"]
    out = tmp_path / "d"
    with directory_written_atomically(str(out)) as work:
        (tmp_path / work / "a").write_text("first")
    with pytest.raises(RuntimeError):
        with directory_written_atomically(str(out)) as work:
            (tmp_path / work / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a").read_text() == "first"
    with directory_written_atomically(str(out)) as work:
        (tmp_path / work / "b").write_text("second")
    assert os.listdir(out) == ["b"] and sorted(os.listdir(tmp_path)) == ["d", "f.json"]
