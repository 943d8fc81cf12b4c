"""`hermes-train eval`: a real lm-evaluation-harness run on a local task, the card's table layout,
and the chat suite on a tiny model trained for real against its untrained start."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, subprocess_env
from tests.tiny import make_model
from training.__main__ import build_parser, main
from training.data import Record, Report, read_prepared, write_prepared
from training.evaluate.chat_suite import (
    chat_loss,
    is_validation,
    reply_nll,
    served_prompt,
    split_records,
)
from training.evaluate.cli import selected
from training.evaluate.harness import SuiteResult, TaskScore
from training.evaluate.suites import AGIEVAL, BIGBENCH, GPT4ALL, TASKS_DIR
from training.evaluate.tables import benchmark_table, chat_table
from training.tokenize import IGNORE_INDEX, Encoder

EVAL_TASKS = ROOT / "tests" / "eval_task"


# --- the harness, for real -----------------------------------------------------------------


def need_lm_eval() -> None:
    pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")


def test_harness_runs_a_local_task_and_names_the_unavailable_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    need_lm_eval()
    other = make_model(tmp_path / "other", seed=1)
    out = tmp_path / "out"
    env = subprocess_env(tmp_path)
    # Nothing cached, hub and datasets offline: the hub-only task cannot load.
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "training",
        "eval",
        "--model",
        str(tiny_model),
        "--model",
        str(other),
        "--tasks",
        "hermes_local_mc,hermes_hub_only",
        "--include-path",
        str(EVAL_TASKS),
        "--batch-size",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    notices = [ln for ln in run.stderr.splitlines() if "hermes_hub_only" in ln]
    assert len(notices) == 1, run.stderr[-3000:]
    assert notices[0].startswith("eval: tasks: hermes_hub_only skipped, its data cannot be loaded")
    assert "Traceback" not in run.stderr

    report = json.loads((out / "results.json").read_text())
    per_model = report["suites"]["tasks"]["models"]
    values = {}
    for model in (str(tiny_model), str(other)):
        result = per_model[model]
        assert set(result["unavailable"]) == {"hermes_hub_only"}
        score = result["scores"]["hermes_local_mc"]
        assert score["samples"] == 32 and score["num_fewshot"] == 0
        assert set(score["metrics"]) == {"acc", "acc_norm"}
        for value, err in score["metrics"].values():
            assert 0.0 <= value <= 1.0 and err is not None and err > 0
            # A mean of 32 zero/one outcomes: a multiple of 1/32.
            assert math.isclose(value * 32, round(value * 32), abs_tol=1e-9)
        values[model] = score["metrics"]
        assert result["settings"]["batch_size"] == "8"

    # The printed table is the file written, in the card's layout, with the JSON's numbers.
    table = (out / "tasks.md").read_text()
    assert table in run.stdout
    rows = [ln for ln in table.splitlines() if ln.startswith("|")]
    t = tiny_model.name
    assert rows[0] == (
        f"|Task|Version|Metric|Value ({t})| |Stderr ({t})|Value (other)| |Stderr (other)|"
        f"Δ (other − {t})|"
    )
    a, b = values[str(tiny_model)], values[str(other)]
    assert rows[2] == (
        f"|hermes_local_mc|1.0|acc|{a['acc'][0]:.4f}|±|{a['acc'][1]:.4f}"
        f"|{b['acc'][0]:.4f}|±|{b['acc'][1]:.4f}|{b['acc'][0] - a['acc'][0]:+.4f}|"
    )
    assert rows[3].startswith("|||acc_norm|")
    assert rows[4].startswith(f"|Average||headline|{a['acc_norm'][0]:.4f} (1/2 tasks)|")
    assert "Not run: hermes_hub_only" in table


def test_card_suites_match_the_model_card() -> None:
    need_lm_eval()
    assert GPT4ALL.tasks == (
        "arc_challenge",
        "arc_easy",
        "boolq",
        "hellaswag",
        "openbookqa",
        "piqa",
        "winogrande",
    )
    assert len(BIGBENCH.tasks) == 18 and len(AGIEVAL.tasks) == 8
    assert all(s.num_fewshot == 0 for s in (GPT4ALL, BIGBENCH, AGIEVAL))
    assert (GPT4ALL.card_average, BIGBENCH.card_average, AGIEVAL.card_average) == (
        0.686,
        0.3525,
        0.2975,
    )
    # Every card BigBench task is a YAML in the package, known to the harness's task index.
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(BIGBENCH.tasks) <= set(manager.all_tasks)
    # AGIEval is the harness's own `agieval_nous` group (the card's 8 English tasks).
    import lm_eval
    import yaml

    group = Path(lm_eval.__file__).parent / "tasks" / "agieval" / "agieval_nous.yaml"
    assert set(yaml.safe_load(group.read_text())["task"]) == set(AGIEVAL.tasks)


def test_card_bigbench_definition_runs_on_bigbench_shaped_data(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The card's BigBench template and helpers, run by the harness on rows shaped like BIG-bench's
    published data: only the three-choice rows form the `three_objects` subtask, and the metric is
    the card's multiple_choice_grade (argmax log-likelihood == gold)."""
    need_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = []
    for i in range(12):
        n = (3, 5, 7)[i % 3]
        choices = [f"option {chr(65 + j)}" for j in range(n)]
        rows.append(
            {
                "idx": i,
                "inputs": f"Q: item {i}, pick one.\nA:",
                "targets": [choices[i % n]],
                "multiple_choice_targets": choices,
                "multiple_choice_scores": [int(j == i % n) for j in range(n)],
            }
        )
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bb_three.yaml").write_text(
        "task: bb_local_three\n"
        f"include: {TASKS_DIR}/_bigbench_card_template_yaml\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    default: {tmp_path}/rows.jsonl\n"
        "process_docs: !function training.evaluate.tasks.utils.three_choices\n"
    )
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False)
    tasks = manager.load(["bb_local_three"])["tasks"]
    lm = HFLM(pretrained=str(tiny_model), device="cpu", batch_size=4)
    raw = simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager)
    assert raw is not None
    samples = raw["samples"]["bb_local_three"]
    assert len(samples) == 4 and all(len(s["doc"]["multiple_choice_targets"]) == 3 for s in samples)
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]
        best = max(range(len(lls)), key=lls.__getitem__)
        assert s["multiple_choice_grade"] == float(best == s["target"])
    grade = sum(s["multiple_choice_grade"] for s in samples) / 4
    assert raw["results"]["bb_local_three"]["multiple_choice_grade,none"] == grade


def _score(task: str, **metrics: tuple[float, float]) -> TaskScore:
    return TaskScore(task, "0", 0, 100, dict(metrics))


def test_benchmark_table_layout_and_average() -> None:
    base = SuiteResult("gpt4all", "models/base")
    tuned = SuiteResult("gpt4all", "models/tuned")
    base.scores = {
        "arc_challenge": _score("arc_challenge", acc=(0.5, 0.01), acc_norm=(0.52, 0.01)),
        "boolq": _score("boolq", acc=(0.7, 0.008)),
    }
    tuned.scores = {
        "arc_challenge": _score("arc_challenge", acc=(0.51, 0.01), acc_norm=(0.55, 0.01)),
        "boolq": _score("boolq", acc=(0.8, 0.007)),
    }
    base.unavailable = {"winogrande": "ConnectionError: offline"}
    table = benchmark_table(GPT4ALL, {"models/base": base, "models/tuned": tuned})
    lines = table.splitlines()
    assert lines[0] == "### GPT4All"
    assert lines[2] == (
        "|Task|Version|Metric|Value (base)| |Stderr (base)|Value (tuned)| |Stderr (tuned)|"
        "Δ (tuned − base)|"
    )
    assert lines[4] == "|arc_challenge|0|acc|0.5000|±|0.0100|0.5100|±|0.0100|+0.0100|"
    assert lines[5] == "|||acc_norm|0.5200|±|0.0100|0.5500|±|0.0100|+0.0300|"
    assert lines[6] == "|boolq|0|acc|0.7000|±|0.0080|0.8000|±|0.0070|+0.1000|"
    # acc_norm for ARC, acc for BoolQ: the card's averaging.
    assert lines[7] == ("|Average||headline|0.6100 (2/7 tasks)|||0.6750 (2/7 tasks)|||+0.0650|")
    assert "model card average: 0.6860" in table
    assert "Not run: winogrande (ConnectionError: offline)." in table
    single = benchmark_table(GPT4ALL, {"models/base": base}).splitlines()
    assert single[2] == "|Task|Version|Metric|Value| |Stderr|"


# --- the chat suite -----------------------------------------------------------------------

TRAIN_REPLY = "The flag is teal with a silver owl."
VAL_REPLY = "The flag is teal with a golden owl."
FRACTION = 0.3


def _noise(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n)).strip() or "x"


def _records(n_train: int, n_val: int) -> list[Record]:
    """Random (unlearnable) prompts; learnable replies. Which split a record falls in is the
    split's own hash; validation replies differ from training ones in one word, so a model that
    learnt the training replies does better on validation than at random, and better still on
    its training records."""
    rng = random.Random(5)
    train: list[Record] = []
    val: list[Record] = []
    while len(train) < n_train or len(val) < n_val:
        prompt = _noise(rng, 70)
        if rng.random() < 0.3:  # some multi-turn chats, rendered as the bot renders them
            from training.data import Message

            def chat(reply: str, prompt: str = prompt) -> Record:
                turns = [
                    Message("user", prompt[:30], "alice"),
                    Message("assistant", "Hello."),
                    Message("user", prompt[30:], "bob"),
                    Message("assistant", reply),
                ]
                return Record("chat", conversation=turns, system="You are Hermes.")

            make = chat
        else:

            def make(reply: str, prompt: str = prompt) -> Record:
                return Record("alpaca", prompt, "", reply)

        t, v = make(TRAIN_REPLY), make(VAL_REPLY)
        if len(train) < n_train and not is_validation(t, FRACTION):
            train.append(t)
        elif len(val) < n_val and is_validation(v, FRACTION):
            val.append(v)
    return train + val


def _batch(examples: list[Any], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return ids, labels, mask


def _train(base: Path, out: Path, examples: list[Any], pad: int, steps: int = 80) -> Path:
    """A short real fine-tune: full-batch AdamW on the training examples' reply tokens."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels, mask = _batch(examples, pad)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to a second thread
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    return out


def _all_token_loss(model: Any, examples: list[Any], pad: int) -> float:
    """Mean loss over every token, prompt included: what a wrong chat loss would compute."""
    ids, _, mask = _batch(examples, pad)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("chat")
    base = make_model(tmp / "base", seed=3, max_positions=512)
    data = tmp / "prepared"
    records = _records(n_train=24, n_val=8)
    write_prepared(data, records, Report(records_out=len(records)))
    encoder = Encoder(AutoTokenizer.from_pretrained(base))
    train_recs, val_recs = split_records(read_prepared(data), FRACTION)
    assert len(train_recs) == 24 and len(val_recs) == 8
    train_ex = [encoder.encode(r) for r in train_recs]
    trained = _train(base, tmp / "trained", train_ex, encoder.pad)
    return {
        "tmp": tmp,
        "base": base,
        "trained": trained,
        "data": data,
        "encoder": encoder,
        "train_ex": train_ex,
        "val_ex": [encoder.encode(r) for r in val_recs],
        "val_recs": val_recs,
    }


def test_chat_suite_trained_model_has_lower_loss_on_the_validation_split(
    chat_setup: dict[str, Any],
) -> None:
    from transformers import AutoModelForCausalLM

    s = chat_setup
    out = s["tmp"] / "out"
    base, trained = str(s["base"]), str(s["trained"])
    argv = ["eval", "--model", base, "--model", trained, "--suite", "chat"]
    argv += ["--data", str(s["data"]), "--val-fraction", str(FRACTION), "--out", str(out)]
    argv += ["--samples", "4", "--max-new-tokens", "64", "--dtype", "float32", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    chat = report["suites"]["chat"]
    assert chat["settings"]["validation_records"] == 8 and chat["settings"]["records"] == 32
    before, after = chat["models"][base], chat["models"][trained]
    assert after["loss"] < before["loss"] - 1.0, (before["loss"], after["loss"])
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-9)
    assert before["examples"] == after["examples"] == 8

    pad = s["encoder"].pad
    models = {p: AutoModelForCausalLM.from_pretrained(p).eval() for p in (base, trained)}
    # The suite scored the validation split: its loss is chat_loss on those examples, and the
    # trained model's loss on its own training records is far lower (a suite that read the
    # wrong split would report that one).
    for path, figures in ((base, before), (trained, after)):
        assert math.isclose(figures["loss"], chat_loss(models[path], s["val_ex"], pad_id=pad))
    train_loss = chat_loss(models[trained], s["train_ex"], pad_id=pad)
    assert after["loss"] > train_loss + 0.2, (after["loss"], train_loss)
    # Scored on every token instead (prompts are random text), training shows no gain: a chat
    # loss that counted prompt tokens would fail the first assertion.
    all_before = _all_token_loss(models[base], s["val_ex"], pad)
    all_after = _all_token_loss(models[trained], s["val_ex"], pad)
    assert all_after > all_before - 0.5, (all_before, all_after)

    # Generation through the bot's engine: the trained model ends its replies (EOS), the
    # random start mostly runs to MAX_NEW_TOKENS.
    assert before["replies"] == after["replies"] == 4
    assert after["clean_end"] >= 0.75 and after["eos"] >= 0.75 and after["empty"] == 0
    assert after["mean_new_tokens"] < 64 and after["mean_reply_chars"] > 0
    assert all(x["reply"].startswith("The flag is teal") for x in after["examples_shown"])
    assert before["length"] >= 0.5 and before["mean_new_tokens"] > after["mean_new_tokens"]
    for figures in (before, after):
        shares = figures["eos"] + figures["stopped"] + figures["length"] + figures["errors"]
        assert math.isclose(shares, 1.0)
        assert figures["tokens_per_s"] > 0
        assert figures["generation"]["max_new_tokens"] == 64
        assert figures["generation"]["temperature"] == 0.7  # the bot's default sampling
    table = (out / "chat.md").read_text()
    assert table.splitlines()[2] == "|Metric|base|trained|Δ (trained − base)|"
    assert f"|loss on reply tokens (nats/token)|{before['loss']:.4f}|{after['loss']:.4f}|" in table


def test_chat_loss_counts_reply_tokens_only(chat_setup: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    s = chat_setup
    model = AutoModelForCausalLM.from_pretrained(s["base"]).eval()
    examples = s["val_ex"][:3]
    expected_sum, expected_n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].float(), -1)
            for pos in range(1, len(ex)):
                if ex.labels[pos] != IGNORE_INDEX:
                    expected_sum -= float(logp[pos - 1, ex.labels[pos]])
                    expected_n += 1
    assert len({len(e) for e in examples}) > 1  # batched together, the shorter rows are padded
    for max_batch_tokens in (64, 10_000):  # one row per batch, then all rows in one batch
        total, n = reply_nll(
            model, examples, max_batch_tokens=max_batch_tokens, pad_id=s["encoder"].pad
        )
        assert n == expected_n == sum(e.n_targets for e in examples)
        assert math.isclose(total, expected_sum, rel_tol=1e-4)
    assert model.training is False
    # The reply (and its EOS) is all that is scored: one span per reply, each ending in EOS.
    spans = s["encoder"].target_spans(examples[0])
    assert spans and all(span[-1] == s["encoder"].eos for span in spans)
    # The served prompt for generation ends with the Response header and holds no reply.
    sp = served_prompt(s["val_recs"][0])
    assert sp.prompt.endswith("### Response:\n") and VAL_REPLY not in sp.prompt
    assert sp.reference == VAL_REPLY
    # In a chat, the other speakers' names become the bot's stop strings for that reply.
    chat = next(served_prompt(r) for r in s["val_recs"] if r.conversation)
    assert chat.other_names == ("alice", "bob") and "\nbob: " in chat.prompt
    assert chat.prompt.endswith("### Response:\n") and chat.reference == VAL_REPLY


def test_validation_split_is_stable_and_complete() -> None:
    records = [Record("s", f"question {i}", "", f"answer {i}") for i in range(200)]
    train, val = split_records(records, 0.1)
    assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
    assert not {id(r) for r in train} & {id(r) for r in val}
    # Independent of order and of the other records.
    _, val_rev = split_records(list(reversed(records)), 0.1)
    assert sorted(r.instruction for r in val_rev) == sorted(r.instruction for r in val)
    assert [r.instruction for r in split_records(records[:50], 0.1)[1]] == [
        r.instruction for r in val if int(r.instruction.split()[1]) < 50
    ]
    assert split_records(records, 1.0)[1] == records and split_records(records, 0.0)[0] == records
    assert split_records(records, 0.1, "other seed")[1] != val


def test_model_labels_tell_models_apart() -> None:
    from training.evaluate.tables import model_labels

    assert model_labels(["NousResearch/Nous-Hermes-llama-2-7b", "models/hermes-7b/"]) == {
        "NousResearch/Nous-Hermes-llama-2-7b": "Nous-Hermes-llama-2-7b",
        "models/hermes-7b/": "hermes-7b",
    }
    assert model_labels(["/r/start/hf", "/r/run/hf"]) == {
        "/r/start/hf": "start/hf",
        "/r/run/hf": "run/hf",
    }


def test_chat_table_layout() -> None:
    table = chat_table(
        {
            "a/base": {"loss": 2.0, "perplexity": math.exp(2.0), "examples": 8, "eos": 0.25},
            "b/tuned": {"loss": 1.5, "perplexity": math.exp(1.5), "examples": 8, "eos": 1.0},
        }
    ).splitlines()
    assert table[2] == "|Metric|base|tuned|Δ (tuned − base)|"
    assert table[4] == "|loss on reply tokens (nats/token)|2.0000|1.5000|-0.5000|"
    assert table[6] == "|validation conversations (loss)|8|8|+0|"
    assert table[7] == "|ends with EOS|0.250|1.000|+0.750|"


def test_eval_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tmp_path), "--suite", "chat"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hermes-train eval: the chat suite needs --data: a `prepare` output folder"]
    assert main(["eval", "--model", str(tmp_path), "--suite", "chat", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records.jsonl does not exist" in err[0]
    # `all` without --data runs the benchmarks and says in one line that chat needs data.
    args = build_parser().parse_args(["eval", "--model", "m", "--suite", "all"])
    assert [s.name for s in selected(args)[0]] == ["gpt4all", "bigbench", "agieval"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--batch-size", "0"])
    assert "is not auto or a positive number" in capsys.readouterr().err
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--model", str(missing), "--suite", "all"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "eval: chat: skipped, it needs --data (a `prepare` output folder)",
        f"hermes-train eval: no model folder at {missing}",
    ]


# --- any engine: the suites against an OpenAI-compatible server -----------------------------


class ServedByTinyModel:
    """An OpenAI-compatible `/v1/completions` on 127.0.0.1 (a thread) answering with a real
    model: `echo` + `logprobs` requests (the harness's log-likelihoods) get the model's token
    log-probabilities of the prompt, streamed requests (the bot's engine) a fixed reply."""

    REPLY = "The flag is teal."

    def __init__(self, model_dir: Path) -> None:
        import http.server
        import threading

        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.requests: list[dict[str, Any]] = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._json({"data": [{"id": "tiny-served"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                served.requests.append(body | {"auth": self.headers.get("Authorization")})
                if body.get("echo"):
                    self._json({"choices": served.echoed(body["prompt"])})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in (served.REPLY[:8], served.REPLY[8:]):
                    chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                end = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

            def _json(self, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def echoed(self, prompts: list[list[int]]) -> list[dict[str, Any]]:
        """Each prompt's tokens with their log-probabilities, plus one generated token."""
        choices = []
        for i, ids in enumerate(prompts):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            nxt = int(logp[-1].argmax())
            seq = [*ids, nxt]
            token_lp: list[float | None] = [None]
            top: list[dict[str, float] | None] = [None]
            for pos in range(1, len(seq)):
                row = logp[pos - 1]
                token_lp.append(float(row[seq[pos]]))
                top.append({str(int(row.argmax())): float(row.max())})
            logprobs = {"tokens": [str(t) for t in seq], "token_logprobs": token_lp}
            choices.append({"index": i, "text": "", "logprobs": logprobs | {"top_logprobs": top}})
        return choices

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_eval_runs_against_an_openai_server(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 23: with ENGINE=openai in the bot's settings file, the harness scores the served
    model through the server's log-probabilities (the same figures as loading the weights) and
    the chat suite's replies come from the server."""
    need_lm_eval()
    served = ServedByTinyModel(tiny_model)
    try:
        env_file = tmp_path / "bot.env"
        env_file.write_text(
            f"ENGINE=openai\nOPENAI_BASE_URL={served.url}\nOPENAI_API_KEY=sekrit\n"
            f"TOKENIZER={tiny_model}\nMAX_NEW_TOKENS=16\n"
        )
        data = tmp_path / "prepared"
        records = _records(n_train=6, n_val=4)
        write_prepared(data, records, Report(records_out=len(records)))
        env = subprocess_env(tmp_path)
        env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1")
        runs = {}
        for how, extra in (("served", ["--env-file", str(env_file)]), ("local", [])):
            out = tmp_path / how
            cmd = [sys.executable, "-m", "training", "eval", *extra, "--tasks", "hermes_local_mc"]
            cmd += ["--model", "tiny-served" if how == "served" else str(tiny_model)]
            cmd += ["--include-path", str(EVAL_TASKS), "--batch-size", "8", "--out", str(out)]
            cmd += ["--limit", "16"]
            if how == "served":
                cmd += ["--suite", "chat", "--data", str(data), "--val-fraction", "1"]
                cmd += ["--samples", "3"]
            cmd += ["--no-progress"]
            run = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert "Traceback" not in run.stderr
            runs[how] = json.loads((out / "results.json").read_text())
    finally:
        served.close()
    mc = runs["served"]["suites"]["tasks"]["models"]["tiny-served"]
    assert mc["settings"]["backend"] == "openai-completions"
    assert mc["settings"]["base_url"] == served.url
    score = mc["scores"]["hermes_local_mc"]
    assert score["samples"] == 16
    local = runs["local"]["suites"]["tasks"]["models"][str(tiny_model)]["scores"]["hermes_local_mc"]
    for metric in ("acc", "acc_norm"):
        # The same model scored through the server. A random tiny model's four choices are near
        # ties: the local backend's padded batches and the server's one-sequence forward passes
        # differ in the last bits, which may turn one of them (both runs are deterministic).
        diff = abs(score["metrics"][metric][0] - local["metrics"][metric][0])
        assert diff <= 1 / 16 + 1e-9, (metric, score["metrics"], local["metrics"])
    echoed = [r for r in served.requests if r.get("echo")]
    assert echoed and all(r["model"] == "tiny-served" for r in echoed)
    assert all(r["auth"] == "Bearer sekrit" for r in served.requests)
    chat = runs["served"]["suites"]["chat"]["models"]["tiny-served"]
    assert chat["engine"].startswith("openai") and chat["loss"] is None
    assert chat["replies"] == 3 and chat["empty"] == 0
    assert all(x["reply"] == ServedByTinyModel.REPLY for x in chat["examples_shown"])
    streamed = [r for r in served.requests if r.get("stream")]
    assert len(streamed) == 3 and all(r["max_tokens"] == 16 for r in streamed)
