"""IFEval scoring with lm-eval's own checkers (`lm_eval.tasks.ifeval`), made to work offline.

lm-eval's checkers try to download NLTK `punkt_tab` at import and then load it to count
sentences. Without network we (1) skip that download during import, (2) count sentences with an
untrained `PunktSentenceTokenizer` (needs no data) and (3) word-tokenize with `preserve_line=True`
(which skips the punkt sentence splitter). We patch this everywhere, even where punkt data exists,
so scores do not depend on what a machine has downloaded. langdetect (the response-language
checker) is seeded so that scores are deterministic.

Strict: the response as is. Loose: lm-eval's upper bound (also tries the response without its
first/last line and without `*` markup). A prompt counts as followed when all its instructions are.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

from pydantic import BaseModel


class IFEvalItem(BaseModel):
    """One IFEval prompt, in IFEval's own format."""

    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


class IFEvalOutcome(BaseModel):
    strict: bool
    loose: bool
    strict_per_instruction: list[bool]
    loose_per_instruction: list[bool]


class _OfflineNltk:
    """nltk as lm-eval's checkers see it: the real module, but a data-free word_tokenize."""

    def __init__(self, nltk_module):
        self._nltk = nltk_module

    def __getattr__(self, name: str):
        return getattr(self._nltk, name)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = True) -> list[str]:
        return self._nltk.word_tokenize(text, language=language, preserve_line=True)


@functools.cache
def _checkers():
    import langdetect
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    real_download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = real_download
    instructions_util._get_sentence_tokenizer = PunktSentenceTokenizer
    instructions_util.nltk = _OfflineNltk(nltk)
    langdetect.DetectorFactory.seed = 0
    return utils


def known_instructions() -> set[str]:
    _checkers()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return set(INSTRUCTION_DICT)


def score_response(item: IFEvalItem, response: str) -> IFEvalOutcome:
    utils = _checkers()
    example = utils.InputExample(key=item.key, instruction_id_list=item.instruction_id_list,
                                 prompt=item.prompt, kwargs=item.kwargs)
    strict = utils.test_instruction_following_strict(example, response)
    loose = utils.test_instruction_following_loose(example, response)
    return IFEvalOutcome(strict=strict.follow_all_instructions, loose=loose.follow_all_instructions,
                         strict_per_instruction=strict.follow_instruction_list,
                         loose_per_instruction=loose.follow_instruction_list)
