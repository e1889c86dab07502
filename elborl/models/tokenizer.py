"""A word-level tokenizer built deterministically from a world's vocabulary.

Trained BPE merges can tie, and a tokenizer trained afresh per process may then assign different ids;
a word-level vocabulary listed in a fixed order cannot, so the ids are a pure function of the vocabulary.
"""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from elborl.shapes.world import Vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TEMPLATE_WORDS = ("a", "an", "photo", "of", "and")


def plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def vocabulary_words(vocab: Vocabulary) -> list[str]:
    words = set(TEMPLATE_WORDS)
    for name in vocab.classes:
        words.update(name.split())
        words.update(plural(name).split())
    for phrase in (*vocab.colors, *vocab.relations, *vocab.number_words.values()):
        words.update(phrase.split())
    return sorted(words)


def build_tokenizer(vocab: Vocabulary, max_length: int = 16) -> PreTrainedTokenizerFast:
    # EOS must not get id 2: transformers' CLIP treats eos_token_id == 2 as a legacy config and pools the
    # highest token id instead of the end token.
    words = [PAD, BOS, UNK, EOS, *vocabulary_words(vocab)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, words.index(BOS)), (EOS, words.index(EOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=max_length,
    )
