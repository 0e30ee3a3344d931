"""Prompts: rows from local files or the Hugging Face hub, prompt templates, a resumable sampler."""
from __future__ import annotations

import datasets
import numpy as np
# Imported at module level on purpose: stage runners are imported in the main thread, and a first
# import of transformers' lazy attributes from two stage threads at once fails.
from transformers import AutoTokenizer

from launch.preflight import BadRow, DataFileError, MissingKey, local_data_file, lookup, read_rows
from rewards.boxed import last_boxed
from rewards.gsm8k import reference_answer

# data.answer_format: the reference answer from the answer field's text (None: it has none).
ANSWER_FORMATS = {"gsm8k": reference_answer, "boxed": last_boxed, "raw": str.strip}


def load_rows(source) -> list[dict]:
    """Rows of a `DataSource`: a local .jsonl/.json/.parquet/.csv file, read as `launch.preflight`
    checks it (JSON values as written, CSV cells as text), else a hub dataset name or a local
    dataset folder, read by `datasets`. Raises DataFileError (FileNotFoundError for a missing
    file) naming the file and the line or row."""
    path = local_data_file(source.path)
    if path is None:
        ds = datasets.load_dataset(source.path, source.config, split=source.split)
        if source.limit is not None:
            ds = ds.select(range(min(source.limit, len(ds))))
        return ds.to_list()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {source.path}")
    rows = []
    for where, row in read_rows(path, source.path):
        if isinstance(row, BadRow) or not isinstance(row, dict):
            raise DataFileError(f"{source.path}{where}: {row if isinstance(row, BadRow) else 'expected a JSON object'}")
        rows.append(row)
        if len(rows) == source.limit:
            break
    if not rows:
        raise DataFileError(f"{source.path}: has no rows")
    return rows


def check_columns(name: str, rows: list[dict], *keys: str) -> None:
    """Raise DataFileError naming `name` unless the first row holds each of `keys` (dotted: see
    `launch.preflight.lookup`)."""
    if not rows:
        return
    missing = [k for k in keys if k not in rows[0] and k.split(".")[0] not in rows[0]]
    if missing:
        raise DataFileError(f"{name}: no column {' or '.join(repr(k) for k in missing)} "
                            f"(columns: {', '.join(map(str, rows[0]))}); see data.question_key, data.answer_key")
    for key in keys:
        try:
            lookup(rows[0], key)
        except MissingKey as e:
            raise DataFileError(f"{name}: row 1: {e}; see data.question_key, data.answer_key") from None


def reference_answers(data_cfg, name: str, rows: list[dict]) -> list[str]:
    """Each row's reference answer: its `answer_key` field, as `answer_format` says. Raises
    DataFileError naming `name` and the row where there is none."""
    normalize = ANSWER_FORMATS[data_cfg.answer_format]
    answers = []
    for number, row in enumerate(rows, 1):
        try:
            answer = normalize(str(lookup(row, data_cfg.answer_key)))
        except MissingKey as e:
            raise DataFileError(f"{name}: row {number}: {e}; see data.answer_key") from None
        if answer is None:
            raise DataFileError(f"{name}: row {number}: {data_cfg.answer_key!r} has no complete \\boxed{{}} "
                                "answer (data.answer_format: boxed)")
        answers.append(answer)
    return answers


def prompt_text(tokenizer, data_cfg, question: str) -> str:
    user = data_cfg.template.replace("{question}", question)
    if not data_cfg.chat_template:
        return user
    messages = [{"role": "user", "content": user}]
    if data_cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": data_cfg.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, data_cfg, rows: list[dict]) -> list[list[int]]:
    """Token ids of each row's prompt, left-truncated to `max_prompt_tokens`."""
    texts = [prompt_text(tokenizer, data_cfg, lookup(row, data_cfg.question_key)) for row in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [p[-data_cfg.max_prompt_tokens:] for p in ids]


def load_problems(recipe, split: str, limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids and reference answers of the recipe's `train` or `eval` split."""
    data, name = recipe.data.for_split(split), getattr(recipe.data, split).path
    rows = load_rows(getattr(data, split))[:limit]
    check_columns(name, rows, data.question_key, data.answer_key)
    references = reference_answers(data, name, rows)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    return encode_prompts(tokenizer, data, rows), references


class PromptSampler:
    """Shuffled passes over N prompts; a new permutation each epoch, fully determined by the seed.

    Its state is two integers, so a resumed run draws exactly the prompts the first run would have.
    """

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts == 0:
            raise ValueError("the train split has no rows")
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_prompts)

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - len(out), self.num_prompts - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()
