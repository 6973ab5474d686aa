"""Generated answers: what a site publishes, what the coordinator keeps, and ``fedpeft generate``.

A tiny Llama federation (in process) where one site publishes prompts: its answers reach
``generations.jsonl`` and the report, equal fedpeft's in-memory model's, and equal what plain
transformers + peft generate from the exported adapter and the merged model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import constants as K
from fedpeft.cli import main
from fedpeft.client.app import make_client_app
from fedpeft.config import ConfigError, FedPeftConfig, compose_config
from fedpeft.data import format_prompt, prompt_ids, tokenize
from fedpeft.generate import GENERATIONS_FILE, generate_answers, published_prompts, read_prompts
from fedpeft.model import build_model, set_flat
from fedpeft.server.federation import run_federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, offline_env, write_causal_jsonl

PROMPTS = ["say good bad", "say <b>nice</b> & fine"]  # the second checks the report escapes
TOKENS = 8

# Plain transformers + peft (no fedpeft): the model card's recipe, greedy; prints the answers.
PLAIN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
mode, folder, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base_dir = folder if mode == "merged" else folder + "/base"
model = AutoModelForCausalLM.from_pretrained(base_dir)
if mode == "export":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, folder)
tokenizer = AutoTokenizer.from_pretrained(base_dir)
model.eval()
answers = []
for prompt in prompts:
    ids = tokenizer(prompt + "\\n", return_tensors="pt").input_ids
    if tokenizer.bos_token_id is not None and ids[0, 0] != tokenizer.bos_token_id:
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    out = model.generate(input_ids=ids, max_new_tokens=int(sys.argv[4]), do_sample=False)
    answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
assert "fedpeft" not in sys.modules, "fedpeft was imported"
print("RESULT", json.dumps(answers))
"""


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def _config(tmp: Path, *overrides: str) -> FedPeftConfig:
    return compose_config(
        [
            "experiment=tiny_causal_lm",
            f"data.path={tmp / 'unused.jsonl'}",
            f"train.eval_max_new_tokens={TOKENS}",
            *overrides,
        ]
    )


def _nodes(tmp: Path, published: dict[int, Path]) -> dict[int, dict[str, Any]]:
    nodes: dict[int, dict[str, Any]] = {}
    for node in (11, 22):
        data = write_causal_jsonl(tmp / f"site{node}.jsonl", n=40, seed=node)
        nodes[node] = {K.NODE_DATA_PATH: str(data), K.NODE_PRIVACY_REQUIRED: "false"}
        if node in published:
            nodes[node][K.NODE_EVAL_PROMPTS] = str(published[node])
    return nodes


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FedPeftConfig, Path]:
    tmp = tmp_path_factory.mktemp("generate")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    config = _config(tmp)
    grid = InProcessGrid(make_client_app(config), _nodes(tmp, {11: prompts}))
    run_federation(grid, config, run_dir=tmp / "run", progress=Progress())
    return config, tmp / "run"


def _in_memory(config: FedPeftConfig, run_dir: Path, prompts: list[str]) -> tuple[str, ...]:
    """fedpeft's own model: the base by its loader, the global adapter from the checkpoint."""
    loaded = build_model(config.model, config.lora, seed=config.seed)
    checkpoint = RunDir(run_dir).latest_checkpoint()
    assert checkpoint is not None
    set_flat(loaded.peft_model, loaded.layout, checkpoint.global_flat)
    return generate_answers(loaded.peft_model, loaded.tokenizer, prompts, max_new_tokens=TOKENS)


def _plain(mode: str, folder: Path, cwd: Path) -> list[str]:
    env = offline_env(HF_HOME=str(cwd / "hf-home"))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, mode, str(folder), json.dumps(PROMPTS), str(TOKENS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.split("RESULT ", 1)[1]))


# --- what a site publishes ---------------------------------------------------------------


def test_prompt_files_are_read_and_bounded(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n", encoding="utf-8")
    assert read_prompts(txt) == ("first", "  second  ")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a string"\n{"prompt": "an object"}\n', encoding="utf-8")
    assert read_prompts(jsonl) == ("a string", "an object")
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"p{i}" for i in range(K.EVAL_PROMPTS_MAX + 1)), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eval-prompts=.*17 prompts; allowed at most 16"):
        read_prompts(many)
    long = tmp_path / "long.txt"
    long.write_text("x" * (K.EVAL_PROMPT_CHARS_MAX + 1), encoding="utf-8")
    with pytest.raises(ConfigError, match="1001 characters; allowed at most 1000"):
        read_prompts(long)
    with pytest.raises(ConfigError, match=r"suffix '\.csv'; allowed: \.txt, \.jsonl"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1 is neither a JSON string"):
        read_prompts(bad)


def test_generation_settings_are_bounded(tmp_path: Path) -> None:
    for bad in ("train.eval_max_new_tokens=0", "train.eval_max_new_tokens=257"):
        with pytest.raises(ConfigError, match=r"train.eval_max_new_tokens=\d+: must be in \[1"):
            _config(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"data.eval_prompts=17: must be in \[0, 16\]"):
        _config(tmp_path, "data.eval_prompts=17")


def test_only_a_simulation_partition_publishes_its_held_out_prompts(tmp_path: Path) -> None:
    held_out = datasets.Dataset.from_dict({"prompt": ["p1", "p2", "p3"], "response": list("abc")})
    config = _config(tmp_path, "data.eval_prompts=2")
    partition = {K.NODE_PARTITION_ID: 0, K.NODE_NUM_PARTITIONS: 2}
    assert published_prompts(config, partition, held_out) == ("p1", "p2")
    assert published_prompts(_config(tmp_path), partition, held_out) == ()
    # a deployed site: the coordinator's data.eval_prompts does not make it publish anything
    deployed = {K.NODE_DATA_PATH: "/data/site.jsonl"}
    assert published_prompts(config, deployed, held_out) == ()
    txt = tmp_path / "mine.txt"
    txt.write_text("mine\n", encoding="utf-8")
    assert published_prompts(config, {**deployed, K.NODE_EVAL_PROMPTS: str(txt)}, held_out) == (
        "mine",
    )
    classification = compose_config(
        ["experiment=tiny_private", f"data.path={tmp_path / 'x.csv'}", "data.eval_prompts=2"]
    )
    assert published_prompts(classification, partition, held_out) == ()


def test_generation_reads_the_prompt_exactly_as_training_does(tmp_path: Path) -> None:
    loaded = build_model(_config(tmp_path).model, _config(tmp_path).lora, seed=0)
    tokenizer = loaded.tokenizer
    assert format_prompt(tokenizer, "hello") == "hello\n"
    table = datasets.Dataset.from_dict({"prompt": ["hello there"], "response": ["general"]})
    config = _config(tmp_path)
    (ids, _, labels), *_ = tokenize(
        table, tokenizer, config=config.data, task="causal_lm", max_length=64
    ).items
    prompt_len = int((labels == -100).sum())
    assert ids[:prompt_len].tolist() == prompt_ids(tokenizer, "hello there")
    assert ids[0] == tokenizer.bos_token_id
    # with a chat template: the template's user turn and generation prompt, BOS not doubled
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "<u>{{ m['content'] }}</u>{% else %}<a>{{ m['content'] }}</a>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    try:
        assert format_prompt(tokenizer, "hi") == "<s><u>hi</u><a>"
        assert prompt_ids(tokenizer, "hi").count(tokenizer.bos_token_id) == 1
        chat = datasets.Dataset.from_dict({"prompt": ["hi"], "response": ["yo"]})
        (ids, _, labels), *_ = tokenize(
            chat, tokenizer, config=config.data, task="causal_lm", max_length=64
        ).items
        first_scored = int((labels != -100).nonzero()[0].item())
        assert ids[:first_scored].tolist() == prompt_ids(tokenizer, "hi")
    finally:
        tokenizer.chat_template = None


# --- a federation with one publishing site -----------------------------------------------


def test_only_the_publishing_site_sends_answers_and_they_are_the_global_adapters(
    run: tuple[FedPeftConfig, Path],
) -> None:
    config, run_dir = run
    rows = [json.loads(line) for line in (run_dir / GENERATIONS_FILE).read_text().splitlines()]
    assert {r["site"] for r in rows} == {"11"}
    assert [(r["round"], r["prompt"]) for r in rows] == [(n, p) for n in (1, 2) for p in PROMPTS]
    last = [r["answer"] for r in rows if r["round"] == 2]
    assert tuple(last) == _in_memory(config, run_dir, PROMPTS)
    assert any(last), "every answer is empty: the comparison would prove nothing"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("eval_generations") for m in metrics] == [2, 2]


def test_the_report_shows_the_latest_answers_escaped_and_the_card_points_to_them(
    run: tuple[FedPeftConfig, Path],
) -> None:
    _, run_dir = run
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    section = page.split('<section id="generations">', 1)[1].split("</section>", 1)[0]
    assert "Generated answers" in section and "after round 2" in section
    assert "say &lt;b&gt;nice&lt;/b&gt; &amp; fine" in section and "<b>nice" not in page
    assert section.count("<tr><td>11</td>") == len(PROMPTS)
    card = (run_dir / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "generations.jsonl" in card
    assert PROMPTS[1] not in card  # the texts stay in the run directory


def test_a_run_without_published_prompts_has_no_answers(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.rounds=1")
    grid = InProcessGrid(make_client_app(config), _nodes(tmp_path, {}))
    run_federation(grid, config, run_dir=tmp_path / "run", progress=Progress())
    assert not (tmp_path / "run" / GENERATIONS_FILE).exists()
    assert 'id="generations"' not in (tmp_path / "run" / "report.html").read_text()
    for reply in grid.received:
        assert K.GENERATIONS not in reply.content.config_records


def test_export_and_merge_generate_with_plain_libraries_as_fedpeft_does(
    run: tuple[FedPeftConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run_dir = run
    expected = list(_in_memory(config, run_dir, PROMPTS))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert _plain("export", tmp_path / "export", tmp_path) == expected
    assert _plain("merged", tmp_path / "merged", tmp_path) == expected
    capsys.readouterr()
    for folder in (tmp_path / "export", tmp_path / "merged", run_dir):
        code = main(["generate", str(folder), PROMPTS[0], "--max-new-tokens", str(TOKENS)])
        assert code == 0
        assert capsys.readouterr().out == expected[0] + "\n", folder


def test_generate_refuses_what_it_cannot_answer_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "neither a 'fedpeft export' folder" in capsys.readouterr().err
    config = _config(tmp_path)
    loaded = build_model(config.model, config.lora, seed=0)
    loaded.peft_model.get_base_model().save_pretrained(str(tmp_path / "m"))
    loaded.tokenizer.save_pretrained(str(tmp_path / "m"))
    assert main(["generate", str(tmp_path / "m"), "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: allowed 1 to 256" in capsys.readouterr().err
    classifier = compose_config(["experiment=tiny_private", f"data.path={tmp_path / 'x.csv'}"])
    build_model(
        classifier.model, classifier.lora, seed=0
    ).peft_model.get_base_model().save_pretrained(str(tmp_path / "c"))
    assert main(["generate", str(tmp_path / "c"), "hi"]) == 2
    assert "generate needs a causal LM" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_a_site_generates_on_its_device(tmp_path: Path) -> None:
    config = _config(tmp_path, "train.device=cuda", "federation.rounds=1")
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS[0] + "\n", encoding="utf-8")
    nodes = _nodes(tmp_path, {11: prompts})
    for node in nodes.values():
        node[K.NODE_DEVICE] = "cuda"
    run_federation(
        InProcessGrid(make_client_app(config), nodes),
        config,
        run_dir=tmp_path / "run",
        progress=Progress(),
    )
    rows = (tmp_path / "run" / GENERATIONS_FILE).read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["site"] == "11"
