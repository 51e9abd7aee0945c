"""Convert the OpenAssistant (oasst1) message-tree export into srlm's seed data.

The export is a forest: one JSON object per message, linked by ``parent_id``. Two products:

- IFT seed (``ift.jsonl``, ``SFTExample``): first-turn prompts with their human-best (rank 0)
  assistant reply, highest human "quality" label first, as in the paper (3,200 examples).
- Ranked prompts (``ranked.jsonl``, ``RankedPrompt``): first-turn prompts with at least two
  human-ranked replies; the source of the EFT seed and the reward-modelling eval set.

Only first turns are used: a deeper reply depends on a conversation the templates do not carry.
A message is usable when it is not deleted, not synthetic and its review did not fail
(``review_result`` null means "not reviewed yet" and is kept; only an explicit ``false`` drops).
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

from srlm.data.records import (RankedPrompt, RecordError, Reply, SFTExample, iter_jsonl, parse_ranked, read_records,
                                resolve_path, write_jsonl)

ROLES = ("prompter", "assistant")


def load_messages(path: str | os.PathLike) -> dict[str, dict]:
    """Read an oasst export into ``{message_id: message}``; errors name file, line and field."""
    messages: dict[str, dict] = {}
    for line, obj in iter_jsonl(path):
        for key in ("message_id", "role", "text"):
            if obj.get(key) is None:
                raise RecordError(path, line, key, "missing required field")
            if not isinstance(obj[key], str):
                raise RecordError(path, line, key, f"expected a string, got {type(obj[key]).__name__}")
        if obj["role"] not in ROLES:
            raise RecordError(path, line, "role", f"expected one of {ROLES}, got {obj['role']!r}")
        parent = obj.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise RecordError(path, line, "parent_id", f"expected a string or null, got {type(parent).__name__}")
        rank = obj.get("rank")
        # bool is an int subclass; a true/false rank is a corrupt record, not rank 1/0
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise RecordError(path, line, "rank", f"expected a non-negative integer or null, got {rank!r}")
        if obj["message_id"] in messages:
            raise RecordError(path, line, "message_id", f"duplicate id {obj['message_id']!r}")
        messages[obj["message_id"]] = obj
    return messages


def quality(message: Mapping[str, Any]) -> float | None:
    """The message's human "quality" label in [0, 1], or None when it has none."""
    labels = message.get("labels") or {}
    names, values = labels.get("name") or [], labels.get("value") or []
    for name, value in zip(names, values):
        if name == "quality" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _unusable(message: Mapping[str, Any]) -> str | None:
    """Why a message must not be used (deleted / review_failed / synthetic / empty), else None."""
    if message.get("deleted"):
        return "deleted"
    if message.get("review_result") is False:
        return "review_failed"
    if message.get("synthetic"):
        return "synthetic"
    if not message["text"].strip():
        return "empty"
    return None


def _children(messages: Mapping[str, dict]) -> dict[str, list[dict]]:
    kids: dict[str, list[dict]] = collections.defaultdict(list)
    for message in messages.values():
        if message.get("parent_id") is not None:
            kids[message["parent_id"]].append(message)
    return kids


def _first_turn_prompts(messages: Mapping[str, dict], lang: str, dropped: Counter[str]) -> list[dict]:
    """Usable root prompts in ``lang``, sorted by id; the reason for each one left out is counted."""
    out = []
    for message in sorted(messages.values(), key=lambda m: m["message_id"]):
        if message.get("parent_id") is not None or message["role"] != "prompter":
            continue
        if message.get("lang") != lang:
            dropped["lang"] += 1
        elif reason := _unusable(message):
            dropped[f"prompt_{reason}"] += 1
        else:
            out.append(message)
    return out


def _replies(kids: Mapping[str, list[dict]], prompt: Mapping[str, Any]) -> list[dict]:
    return [m for m in kids.get(prompt["message_id"], []) if m["role"] == "assistant"]


def build_ift(
    messages: Mapping[str, dict],
    *,
    lang: str = "en",
    top_k: int | None = 3200,
    min_prompt_chars: int = 10,
    min_response_chars: int = 20,
    dropped: Counter[str] | None = None,
) -> list[SFTExample]:
    """First-turn prompts with their rank-0 reply, best "quality" label first, at most ``top_k``.

    A prompt whose rank-0 reply is unusable is dropped rather than given its rank-1 reply: the
    seed is meant to hold only human-best answers. ``dropped``, when given, is incremented with
    one reason per root prompt left out (``top_k`` counts the ones cut by the limit).
    """
    dropped = dropped if dropped is not None else collections.Counter()
    kids = _children(messages)
    kept: list[tuple[dict, dict]] = []
    for prompt in _first_turn_prompts(messages, lang, dropped):
        if len(prompt["text"].strip()) < min_prompt_chars:
            dropped["prompt_short"] += 1
            continue
        best = [m for m in _replies(kids, prompt) if m.get("rank") == 0]
        if not best:
            dropped["no_rank0_reply"] += 1
            continue
        # the export has one rank-0 reply per prompt; be deterministic if it ever has more
        reply = min(best, key=lambda m: (-(quality(m) or 0.0), m["message_id"]))
        if reply.get("lang") != lang:
            dropped["reply_lang"] += 1
        elif reason := _unusable(reply):
            dropped[f"reply_{reason}"] += 1
        elif len(reply["text"].strip()) < min_response_chars:
            dropped["reply_short"] += 1
        else:
            kept.append((prompt, reply))

    def order(pair: tuple[dict, dict]) -> tuple:
        q = quality(pair[1])
        return (q is None, -(q or 0.0), pair[1]["message_id"])

    kept.sort(key=order)
    if top_k is not None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        if len(kept) > top_k:
            dropped["top_k"] += len(kept) - top_k
        kept = kept[:top_k]
    return [SFTExample(prompt=p["text"], response=r["text"], id=r["message_id"]) for p, r in kept]


def build_ranked(
    messages: Mapping[str, dict],
    *,
    lang: str = "en",
    min_replies: int = 2,
    dropped: Counter[str] | None = None,
) -> list[RankedPrompt]:
    """First-turn prompts with at least ``min_replies`` usable, human-ranked replies, by prompt id.

    Replies are sorted by rank; ranks are re-numbered densely (0, 1, ...) because filtering can
    leave gaps (a deleted rank-1 reply turns 0, 2 into 0, 1). ``dropped``, when given, is
    incremented with one reason per root prompt left out.
    """
    if min_replies < 2:
        raise ValueError(f"min_replies must be >= 2 (a ranking needs two replies), got {min_replies}")
    dropped = dropped if dropped is not None else collections.Counter()
    kids = _children(messages)
    out = []
    for prompt in _first_turn_prompts(messages, lang, dropped):
        replies = [
            m
            for m in _replies(kids, prompt)
            if m.get("rank") is not None and m.get("lang") == lang and _unusable(m) is None
        ]
        if len(replies) < min_replies:
            dropped["too_few_replies"] += 1
            continue
        replies.sort(key=lambda m: (m["rank"], m["message_id"]))
        dense = {rank: i for i, rank in enumerate(sorted({m["rank"] for m in replies}))}
        out.append(
            RankedPrompt(
                id=prompt["message_id"],
                prompt=prompt["text"],
                replies=[Reply(text=m["text"], rank=dense[m["rank"]]) for m in replies],
            )
        )
    return out


def convert_oasst(
    input: str,
    output_dir: str,
    lang: str = "en",
    top_k: int = 3200,
    min_replies: int = 2,
) -> dict:
    """Convert an OpenAssistant (oasst1) message-tree export into IFT and ranked-prompt files.

    Writes ``output_dir/ift.jsonl`` (first-turn prompts with their rank-0 reply, highest human
    quality label first) and ``output_dir/ranked.jsonl`` (first-turn prompts with several
    human-ranked replies: the EFT source and reward-modelling eval set), each atomically.

    Args:
        input: Path of the export, one JSON message per line (e.g. an oasst1 ``*.messages.jsonl``).
        output_dir: Folder to write ``ift.jsonl`` and ``ranked.jsonl`` into (created if missing).
        lang: Language code of the prompts and replies to keep.
        top_k: Keep at most this many IFT examples (the paper used 3,200).
        min_replies: Least number of usable ranked replies for a prompt to enter ``ranked.jsonl``.

    Returns:
        Counts: ``messages`` read, ``ift`` and ``ranked`` records written, and for each reason a
        prompt was left out, ``ift_dropped_<reason>`` / ``ranked_dropped_<reason>``.
    """
    messages = load_messages(input)
    ift_dropped: Counter[str] = collections.Counter()
    ranked_dropped: Counter[str] = collections.Counter()
    ift = build_ift(messages, lang=lang, top_k=top_k, dropped=ift_dropped)
    ranked = build_ranked(messages, lang=lang, min_replies=min_replies, dropped=ranked_dropped)
    out = Path(output_dir)
    counts: dict[str, int] = {
        "messages": len(messages),
        "ift": write_jsonl(out / "ift.jsonl", ift),
        "ranked": write_jsonl(out / "ranked.jsonl", ranked),
    }
    counts.update({f"ift_dropped_{k}": v for k, v in sorted(ift_dropped.items())})
    counts.update({f"ranked_dropped_{k}": v for k, v in sorted(ranked_dropped.items())})
    print(", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def _tree_side(tree_id: str, seed: int) -> float:
    """A deterministic number in [0, 1) for a message tree: sha256 of ``"<seed>:<tree id>"``."""
    digest = hashlib.sha256(f"{seed}:{tree_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def read_ranked(path: str, max_prompts: Optional[int] = None) -> list[RankedPrompt]:
    """RankedPrompt records from a ranked jsonl (``seed:`` paths allowed), or from an OpenAssistant export
    converted on the fly; the first ``max_prompts`` of them when given."""
    resolved = resolve_path(path)
    first = next(iter_jsonl(resolved), None)
    if first is None:
        raise ValueError(f"{resolved}: no records")
    if "message_id" in first[1]:  # an oasst message-tree export, not ranked records
        ranked = build_ranked(load_messages(resolved))
    else:
        ranked = read_records(resolved, parse_ranked)
    return ranked[:max_prompts] if max_prompts is not None else ranked


def split_ranked(
    input: str,
    train_output: str,
    eval_output: str,
    eval_fraction: float = 0.5,
    seed: int = 0,
) -> dict:
    """Split ranked prompts into a train and an eval file by message tree, so no tree is on both sides.

    A ranked prompt is a first-turn prompt, so its id is the root message id of its OpenAssistant
    tree (``message_tree_id``), and one ranked record is one whole tree. Each tree goes to the eval
    side when ``sha256("<seed>:<id>")``, read as a number in [0, 1), is below ``eval_fraction``:
    the assignment of a tree depends only on its id and the seed (it never moves when other trees
    are added or removed), so the shares are ``eval_fraction`` on average, not exactly. Records
    keep their input order; both files are written atomically.

        python main.py split-ranked --input ../shared/data/oasst1-en-sample.jsonl \\
            --train_output runs/eft/oasst_train_ranked.jsonl --eval_output runs/eft/oasst_eval_ranked.jsonl

    Args:
        input: ranked prompts jsonl (``{"id", "prompt", "replies": [{"text", "rank"}]}``, ``seed:`` paths
            allowed), or an OpenAssistant message export, converted with ``build_ranked`` (English,
            at least two usable ranked replies).
        train_output: ranked jsonl for the training side (the EFT source).
        eval_output: ranked jsonl for the held-out side (the reward-modelling eval set).
        eval_fraction: expected share of trees on the eval side, in [0, 1].
        seed: changes the assignment; the same seed always gives the same split.

    Returns:
        Counts: ``prompts`` read, ``train`` and ``eval`` prompts written, ``train_replies`` and
        ``eval_replies``.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    ranked = read_ranked(input)
    train, held = [], []
    for prompt in ranked:
        (held if _tree_side(prompt.id, seed) < eval_fraction else train).append(prompt)
    counts = {
        "prompts": len(ranked),
        "train": write_jsonl(train_output, train),
        "eval": write_jsonl(eval_output, held),
        "train_replies": sum(len(p.replies) for p in train),
        "eval_replies": sum(len(p.replies) for p in held),
    }
    print(", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts
