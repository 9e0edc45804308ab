"""The identifier in an instance prompt (``photo of ohwx dog``): how rare it is for the model's
own tokenizer, which common words and strong meanings to avoid, and rare tokens to suggest."""
from __future__ import annotations

import re
from typing import Iterable

from dreambooth.data.pictures import FILEWORDS

# CLIP BPE ids follow merge order, i.e. frequency in CLIP's training text: a whole-word token with
# a low id is a word the model knows well. Measured: dog 1929, photo 1125, gogh 19697,
# picasso 21481, tok 27010, ohwx 47993, sks 48136.
COMMON_WORD_MAX_ID = 10000
KNOWN_WORD_MAX_ID = 35000
# Single tokens that look rare but have a strong meaning for the model.
KNOWN_MEANINGS = {"sks": "the SKS rifle: pictures of guns leak into your subject"}
SUGGESTED_IDENTIFIERS = ("ohwx", "wawx", "sleg", "phol", "nyrd", "ront")
# Words of a prompt that are never the identifier.
IDENTIFIER_STOP_WORDS = frozenset({"a", "an", "the", "of", "by", "in", "photo"})

def _token_ids(word: str, tokenizer) -> tuple[list[str], list[int]]:
    pieces = tokenizer.tokenize(word) if word else []
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(pieces)] if pieces else []
    return pieces, ids


def identifier_report(identifier: str, tokenizer, exclude: Iterable[str] = ()) -> dict:
    """How the model's tokenizer sees a proposed identifier (the seed's [V]).

    Heuristic (CLIP BPE ids follow merge order, i.e. word frequency): a whole-word token with
    id < 10000 is a common word, < 35000 a known word; one rare whole-word token (id >= 35000) is
    what the seed asks for. Words with a strong meaning despite a high id (``sks``: a rifle) are
    listed in KNOWN_MEANINGS. ``verdict`` is "good", "ok" (works, not ideal) or "poor".
    ``suggestions`` never hold a word of the identifier nor of ``exclude`` (e.g. the prompts'
    words: :func:`identifier_hint` passes them)."""
    word = " ".join(identifier.split())
    pieces, ids = _token_ids(word, tokenizer)
    whole_word = len(pieces) == 1 and pieces[0].endswith("</w>")
    common = whole_word and ids[0] < COMMON_WORD_MAX_ID
    known = whole_word and ids[0] < KNOWN_WORD_MAX_ID
    meaning = KNOWN_MEANINGS.get(word.lower())
    if not word:
        verdict, message = "poor", "give an identifier: a rare word such as 'ohwx'"
    elif "[" in word or "]" in word:
        verdict, message = "poor", ("[V] stands for your identifier: replace it with a rare word "
                                    "such as 'ohwx'")
    elif meaning:
        verdict, message = "poor", (f"{word!r} is a poor identifier: {meaning}; pick a rare "
                                    "single token")
    elif common:
        verdict, message = "poor", (f"{word!r} is a common word (token {ids[0]}): the model's "
                                    "meaning for it will fight your subject; pick a rare token")
    elif known:
        verdict, message = "ok", (f"{word!r} is one token but a word the model knows (token "
                                  f"{ids[0]}); a rarer token learns faster")
    elif len(pieces) == 1:
        verdict, message = "good", f"{word!r} is a single rare token (id {ids[0]})"
    else:
        verdict, message = "ok", (f"{word!r} takes {len(pieces)} tokens "
                                  f"({' + '.join(p.replace('</w>', '') for p in pieces)}); "
                                  "it works, but a single rare token is learned more cleanly")
    return {"identifier": word, "tokens": len(pieces), "ids": ids,
            "pieces": [p.replace("</w>", "") for p in pieces], "whole_word": whole_word,
            "common_word": bool(common), "known_word": bool(known), "known_meaning": meaning,
            "verdict": verdict, "message": message,
            "suggestions": suggest_identifiers(tokenizer, exclude=[*word.lower().split(), *exclude])
            if verdict != "good" else []}


def suggest_identifiers(tokenizer, count: int = 5, exclude: Iterable[str] = ()) -> list[str]:
    """Identifiers known to be single rare CLIP tokens with no strong meaning (hand-picked from
    the vocabulary's highest ids: most rare tokens there are still words, e.g. "kilt"), kept only
    when this tokenizer agrees; never one of the words in ``exclude`` (any case)."""
    taken = {w.lower() for w in exclude}
    found = []
    for word in SUGGESTED_IDENTIFIERS:
        if word in taken:
            continue
        pieces = tokenizer.tokenize(word)
        if len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces)[0] >= KNOWN_WORD_MAX_ID:
            found.append(word)
    return found[:count]


def guess_identifier(instance_prompt: str, class_prompt: str) -> str:
    """The words of the instance prompt that the class prompt lacks ("photo of zwx dog" vs
    "photo of a dog" -> "zwx"); "" when there are none. Without a class prompt that is every
    word but the stop words ("zwx dog"): :func:`identifier_hint` picks one word instead."""
    class_words = set(_prompt_words(class_prompt))
    words = [w for w in _prompt_words(instance_prompt.replace(FILEWORDS, " "))
             if w not in class_words and w not in IDENTIFIER_STOP_WORDS]
    return " ".join(words)


def _prompt_words(prompt: str) -> list[str]:
    """A prompt's words, lower case; a bracketed placeholder ("[V]") is one word."""
    return re.findall(r"[\w\[\]]+", (prompt or "").lower())


def _rarest_word(words: Iterable[str], tokenizer) -> str:
    """The word of ``words`` most likely meant as the identifier, by the tokenizer: a placeholder
    ("[v]": the user must replace it) first; then single rare tokens (id >= KNOWN_WORD_MAX_ID,
    what the seed asks for: "ohwx", "sks"), the rarest (highest id) first; then words the
    vocabulary does not hold as one token ("zwx" = z + wx), the first in the prompt; then known
    single tokens (COMMON_WORD_MAX_ID <= id < KNOWN_WORD_MAX_ID: "corgi"), the rarest first.
    Common words (a single token with id < COMMON_WORD_MAX_ID: "dog", "photo") never; "" when
    only those are left."""
    best, best_rank = "", None
    for position, word in enumerate(dict.fromkeys(words)):
        if "[" in word or "]" in word:
            rank: tuple = (0, position)
        else:
            pieces, ids = _token_ids(word, tokenizer)
            if not pieces:
                continue
            single = len(pieces) == 1 and pieces[0].endswith("</w>")
            if single and ids[0] < COMMON_WORD_MAX_ID:
                continue
            if single and ids[0] >= KNOWN_WORD_MAX_ID:
                rank = (1, -ids[0], position)
            elif not single:
                rank = (2, position)
            else:
                rank = (3, -ids[0], position)
        if best_rank is None or rank < best_rank:
            best, best_rank = word, rank
    return best


def identifier_hint(instance_prompt: str, class_prompt: str, tokenizer) -> dict | None:
    """The identifier of a concept's prompts, as the tokenizer sees it: an
    :func:`identifier_report` dict, or None when there is nothing to say (no instance prompt, no
    tokenizer, a prompt of [filewords] alone, an instance prompt that the class prompt covers).

    With a class prompt the identifier is what the instance prompt adds to it
    (:func:`guess_identifier`: "photo of zwx dog" vs "photo of a dog" -> "zwx"). Without one it
    is the rarest word of the instance prompt (:func:`_rarest_word`), so the class noun is not
    counted in ("photo of zwx dog" -> "zwx", not "zwx dog"); when every word is a common one the
    report says that the prompt lacks an identifier. Suggestions never repeat a word of either
    prompt."""
    instance_prompt, class_prompt = instance_prompt or "", class_prompt or ""
    if not instance_prompt.strip() or tokenizer is None:
        return None
    without_filewords = re.sub(re.escape(FILEWORDS), " ", instance_prompt, flags=re.IGNORECASE)
    used = _prompt_words(without_filewords) + _prompt_words(class_prompt)
    if class_prompt.strip():
        identifier = guess_identifier(without_filewords, class_prompt)
        return identifier_report(identifier, tokenizer, exclude=used) if identifier else None
    words = [w for w in _prompt_words(without_filewords) if w not in IDENTIFIER_STOP_WORDS]
    if not words:
        return None  # [filewords] alone: the captions hold the words
    identifier = _rarest_word(words, tokenizer)
    if identifier:
        return identifier_report(identifier, tokenizer, exclude=used)
    report = identifier_report("", tokenizer, exclude=used)
    example = report["suggestions"][0] if report["suggestions"] else "ohwx"
    report["message"] = (f"{instance_prompt.strip()!r} holds no rare word to be the identifier "
                         f"(only common words the model knows well); add one before the class "
                         f"noun, e.g. {example!r}")
    return report
