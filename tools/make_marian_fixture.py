#!/usr/bin/env python3
"""Reference data for loading Hugging Face Marian (OPUS-MT) checkpoints (`transformers.MarianMTModel`).

Writes two tiny Marian checkpoints, trained here to translate a small English-German corpus, with their tokenizer files and the
outputs of the PyTorch model, into `tests/fixtures/marian/<variant>/`:

* `shared`: laid out like Helsinki-NLP/opus-mt-en-de: one vocabulary for both sides
  (`share_encoder_decoder_embeddings=True`, so `model.shared` = encoder and decoder embeddings =
  `lm_head`), swish (SiLU) activation, `scale_embedding=True` (embeddings times sqrt(d_model)),
  static sinusoidal positions (sin in the first half of each vector, cos in the second),
  `<pad>` = last id = `decoder_start_token_id`, `</s>` = 0 = EOS = forced EOS.
* `separate`: `share_encoder_decoder_embeddings=False` with a separate target vocabulary
  (`target_vocab.json`, tokenizer `separate_vocabs=True`, `decoder_vocab_size` != `vocab_size`),
  gelu activation, `scale_embedding=False`. transformers then keeps `model.encoder.embed_tokens`
  and `model.decoder.embed_tokens` apart and, with the default `tie_word_embeddings=True`, ties
  `lm_head.weight` to `model.decoder.embed_tokens.weight`.

Both variants are d_model 32, 4 heads, FFN 64, 2 encoder + 2 decoder layers,
max_position_embeddings 64.

Tokenizer: two SentencePiece unigram models (source English-like, target German-like text built
here from fixed templates with `random.Random(SEED)`), trained with the `sentencepiece` package
(`num_threads=1`, no input shuffling, default `nmt_nfkc` normalisation, add_dummy_prefix and
remove_extra_whitespaces on, character_coverage 1.0, so characters that never occur in a model's
training text (for instance `ü` and `ß` for the English model) are `<unk>` for it). Both variants
use the same two `.spm` files. `vocab.json` is what MarianTokenizer expects: `"</s>": 0`,
`"<unk>": 1`, then the NORMAL pieces of the source model in SentencePiece id order, then (shared
variant) the NORMAL pieces of the target model that are not yet in it, in target id order, then
`"<pad>"` last. SentencePiece's own `<unk>`, `<s>`, `</s>` pieces are not copied (Marian's
vocabularies have no `<s>`). The separate variant's `vocab.json` has the source pieces only and
its `target_vocab.json` is `</s>`, `<unk>`, the target pieces, `<pad>`. `tokenizer_config.json`
and the vocabularies are written by `MarianTokenizer.save_pretrained`.

Weights: `torch.manual_seed(model_seed)` (`seed`, `seed + 1` for `separate`), then
`MarianMTModel(config)` (transformers' init), then `TRAIN_STEPS` AdamW steps (batch
`TRAIN_BATCH`, lr `TRAIN_LR`, weight decay 0.01, label smoothing `LABEL_SMOOTHING`, one thread)
on the parallel corpus of the templates below (the English and German templates are aligned
item for item), with batches drawn by `random.Random(model_seed)`. Training, rather than random
weights, gives what a real checkpoint has and random ones lack together: outputs that depend on
the source (greedy rows translate, end early or run to `max_length`) and moderate conditioning,
so float32 implementations agree to about 1e-6 on the logits (random weights large enough to
give varied decodings put transformers' own float32 logits 3e-4 from its float64 pass). The
untrained `final_logits_bias` buffer is then drawn from N(0, `FINAL_LOGITS_BIAS_STD`^2) so the
loader's handling of it matters. The greedy decodings of the fixture sentences must end at
least two rows with a generated EOS well before `max_length`, run at least two to
`max_length` (where `forced_eos_token_id` puts EOS last) and not repeat a few tokens
(`greedy_ok`), or the script stops. The written directory is then reloaded with
`from_pretrained` (model and tokenizer) and must give bit-identical logits and the same ids.

Reference outputs (eval mode, float32, CPU), per variant, in `expected.json` and
`expected.safetensors` (see the Marian section of `tests/fixtures/FORMAT.md` for every key):
tokenizer ids of the source sentences (padded batch and unpadded), of target texts
(`tokenizer(text_target=...)`) and of extra tokenizer-only edge cases; a teacher-forced forward
pass (`logits`, `encoder_output`); `generate` greedy (`num_beams=1`) and beam
(`num_beams=4`) with the checkpoint's generation config (bad_words_ids [[pad]],
renormalize_logits, forced EOS, length_penalty 1.0, early_stopping False), with
`batch_decode(..., skip_special_tokens=True)` texts.

`--full DIR` instead builds the `shared` layout at the real opus-mt-en-de size (d_model 512,
8 heads, FFN 2048, 6+6 layers, max_position_embeddings 512, vocab 58101: the real pieces of the
two .spm models, then filler pieces `▁tok<N>` up to id 58099, `<pad>` = 58100) with transformers'
default random init (`init_std` 0.02), and saves model + tokenizer + generation config
(`max_length` 512) into DIR (default `target/models/opus-mt-en-de-random`, 296 MB, about three
minutes) with the same `expected.json` / `expected.safetensors` as the fixtures (the reference
outputs use `max_length` 16). It serves the speed benchmarks and the ignored full-size test of
`tests/marian.rs` (`cargo test --release --test marian -- --ignored`). Random weights at this
size make greedy and beam search repeat one token per row (the tied table's fixpoint, at any
init scale tried up to 0.1), so there the generation check is only a weak one; the logits are
the strong check.

Running the script twice gives identical files (torch 2.15, transformers 5.25.0,
sentencepiece 0.2.3 on x86-64).

Usage:
    python tools/make_marian_fixture.py [--out tests/fixtures/marian] [--seed 20170612]
    python tools/make_marian_fixture.py --full [DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import warnings

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

SEED = 20170612
SPM_VOCAB = {"source": 250, "target": 220}
MAX_LENGTH = 16
NUM_BEAMS = 4
# generate()'s defaults when the generation config leaves them unset (it does, as opus-mt-en-de's).
LENGTH_PENALTY = 1.0
EARLY_STOPPING = False
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Training text (deterministic templates)
# ----------------------------------------------------------------------------------------------

EN_SUBJECTS = ["the cat", "a small dog", "my brother", "our teacher", "the old man", "every child",
               "the new machine", "a young woman", "the farmer", "this company", "the river",
               "my neighbour", "the students", "a tired traveller", "the orchestra", "her friend"]
EN_VERBS = ["sees", "likes", "builds", "reads", "opens", "carries", "finds", "washes", "paints",
            "sells", "repairs", "watches", "follows", "describes", "remembers", "explains"]
EN_OBJECTS = ["the house", "a red apple", "the long letter", "an old book", "the window",
              "three heavy boxes", "the blue car", "a quiet garden", "the morning train",
              "a difficult question", "the kitchen table", "two green bottles", "the city map",
              "a warm coat", "the broken clock", "the evening news"]
EN_TAILS = ["", " today", " in the morning", " after dinner", " every week", " with great care",
            " near the station", " before the storm", ", and then sleeps", " because it is late",
            " at the café", " on Monday", " for 12 euros", " again and again", " (twice)",
            " very slowly"]
EN_EXTRA = ["Where is the station?", "How much does it cost?", "I do not know.", "Yes, of course!",
            "Thank you very much.", "Good morning, Mr. Smith.", "It is 7:30 now.", "Please wait here.",
            "What a beautiful day!", "The résumé is on the desk.", "We meet at noon; bring food.",
            "She said: \"come in\".", "Numbers: 1, 2, 3, 42 and 1000.", "Is it true? Maybe.",
            "Winter brings snow, wind and frozen lakes.", "Fresh bread, butter, cheese and jam for breakfast.",
            "The museum shows paintings, sculptures and ancient coins.", "Doctors, nurses and pilots work at night.",
            "Yesterday we visited Paris, Berlin, Vienna and Zurich.", "Mathematics, physics and chemistry are hard.",
            "Elephants, tigers, zebras and monkeys live in the jungle.", "Quickly jump over the lazy fox!",
            "Computers, keyboards, printers and screens are expensive.", "Umbrellas protect us from rain and sun."]

DE_SUBJECTS = ["die Katze", "ein kleiner Hund", "mein Bruder", "unser Lehrer", "der alte Mann",
               "jedes Kind", "die neue Maschine", "eine junge Frau", "der Bauer", "diese Firma",
               "der Fluss", "mein Nachbar", "die Studenten", "ein müder Reisender", "das Orchester",
               "ihre Freundin"]
DE_VERBS = ["sieht", "mag", "baut", "liest", "öffnet", "trägt", "findet", "wäscht", "malt",
            "verkauft", "repariert", "beobachtet", "folgt", "beschreibt", "erinnert sich an",
            "erklärt"]
DE_OBJECTS = ["das Haus", "einen roten Apfel", "den langen Brief", "ein altes Buch", "das Fenster",
              "drei schwere Kisten", "das blaue Auto", "einen ruhigen Garten", "den Morgenzug",
              "eine schwierige Frage", "den Küchentisch", "zwei grüne Flaschen", "den Stadtplan",
              "einen warmen Mantel", "die kaputte Uhr", "die Abendnachrichten"]
DE_TAILS = ["", " heute", " am Morgen", " nach dem Abendessen", " jede Woche", " mit großer Sorgfalt",
            " in der Nähe des Bahnhofs", " vor dem Sturm", " und schläft dann", " weil es spät ist",
            " im Café", " am Montag", " für 12 Euro", " immer wieder", " (zweimal)", " sehr langsam"]
DE_EXTRA = ["Wo ist der Bahnhof?", "Wie viel kostet das?", "Ich weiß es nicht.", "Ja, natürlich!",
            "Vielen Dank.", "Guten Morgen, Herr Schmidt.", "Es ist jetzt 7:30 Uhr.", "Bitte warten Sie hier.",
            "Was für ein schöner Tag!", "Der Lebenslauf liegt auf dem Tisch.", "Wir treffen uns um zwölf; bring Essen mit.",
            "Sie sagte: \"komm herein\".", "Zahlen: 1, 2, 3, 42 und 1000.", "Ist das wahr? Vielleicht.",
            "Der Winter bringt Schnee, Wind und gefrorene Seen.", "Frisches Brot, Butter, Käse und Marmelade zum Frühstück.",
            "Das Museum zeigt Gemälde, Skulpturen und antike Münzen.", "Ärzte, Pflegerinnen und Piloten arbeiten nachts.",
            "Gestern besuchten wir Paris, Berlin, Wien und Zürich.", "Mathematik, Physik und Chemie sind schwer.",
            "Elefanten, Tiger, Zebras und Affen leben im Dschungel.", "Spring schnell über den faulen Fuchs!",
            "Computer, Tastaturen, Drucker und Bildschirme sind teuer.", "Regenschirme schützen uns vor Regen und Sonne."]


def corpus(subjects, verbs, objects, tails, extra, seed):
    """A few hundred sentences: every subject/verb pair with a drawn object and tail, plus extras."""
    rng = random.Random(seed)
    lines = []
    for s in subjects:
        for v in verbs:
            o = rng.choice(objects)
            t = rng.choice(tails)
            line = f"{s} {v} {o}{t}."
            lines.append(line[0].upper() + line[1:])
    lines += extra * 3
    return lines


def train_spm(lines, path, vocab_size):
    """Unigram SentencePiece model over `lines`, written to `path` (deterministic)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def normal_pieces(path):
    sp = spm.SentencePieceProcessor(model_file=path)
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i):
            continue
        out.append(sp.id_to_piece(i))
    return out


def vocab_from(piece_lists, size=None):
    """`</s>` 0, `<unk>` 1, the pieces in order (first occurrence), optional fillers, `<pad>` last."""
    vocab = {"</s>": 0, "<unk>": 1}
    for pieces in piece_lists:
        for p in pieces:
            if p not in vocab:
                vocab[p] = len(vocab)
    if size is not None:
        n = 0
        while len(vocab) < size - 1:
            filler = f"▁tok{n}"
            n += 1
            if filler not in vocab:
                vocab[filler] = len(vocab)
    vocab["<pad>"] = len(vocab)
    return vocab


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def build_tokenizer(work, separate, full_size=None):
    """Trains (once per `work` dir) the .spm models and returns a MarianTokenizer over them."""
    src_spm = os.path.join(work, "source.spm")
    tgt_spm = os.path.join(work, "target.spm")
    if not os.path.exists(src_spm):
        train_spm(corpus(EN_SUBJECTS, EN_VERBS, EN_OBJECTS, EN_TAILS, EN_EXTRA, SEED), src_spm, SPM_VOCAB["source"])
        train_spm(corpus(DE_SUBJECTS, DE_VERBS, DE_OBJECTS, DE_TAILS, DE_EXTRA, SEED + 1), tgt_spm, SPM_VOCAB["target"])
    src_pieces, tgt_pieces = normal_pieces(src_spm), normal_pieces(tgt_spm)
    tag = "separate" if separate else "shared"
    vocab_path = os.path.join(work, f"vocab_{tag}.json")
    if separate:
        write_json(vocab_path, vocab_from([src_pieces]))
        tvocab_path = os.path.join(work, "target_vocab_separate.json")
        write_json(tvocab_path, vocab_from([tgt_pieces]))
        return MarianTokenizer(src_spm, tgt_spm, vocab_path, target_vocab_file=tvocab_path,
                               separate_vocabs=True)
    write_json(vocab_path, vocab_from([src_pieces, tgt_pieces], size=full_size))
    return MarianTokenizer(src_spm, tgt_spm, vocab_path)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def make_config(tok, separate, full=False):
    vocab_size = len(tok.encoder)
    if separate:
        dec_vocab = len(tok.target_encoder)
        pad = tok.target_encoder["<pad>"]
    else:
        dec_vocab = vocab_size
        pad = tok.encoder["<pad>"]
    size = dict(d_model=512, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                decoder_ffn_dim=2048, encoder_layers=6, decoder_layers=6, max_position_embeddings=512) if full \
        else dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2, max_position_embeddings=64)
    return MarianConfig(
        vocab_size=vocab_size,
        decoder_vocab_size=dec_vocab,
        activation_function="gelu" if separate else "swish",
        scale_embedding=not separate,
        share_encoder_decoder_embeddings=not separate,
        static_position_embeddings=True,
        normalize_embedding=False,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        bos_token_id=None,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        **size,
    )


def generation_config(pad):
    """As opus-mt-en-de's generation_config.json, with a small max_length."""
    return GenerationConfig(
        bad_words_ids=[[pad]],
        bos_token_id=0,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        max_length=MAX_LENGTH,
        num_beams=NUM_BEAMS,
        pad_token_id=pad,
        renormalize_logits=True,
    )


# Training (a tiny translation model, so the fixture is as well-conditioned as a real one)
TRAIN_STEPS = 2500
TRAIN_BATCH = 32
TRAIN_LR = 3e-3
LABEL_SMOOTHING = 0.1
# N(0, FINAL_LOGITS_BIAS_STD^2) drawn into the (untrained) `final_logits_bias` buffer, so the
# loader's handling of it matters.
FINAL_LOGITS_BIAS_STD = 0.1


def parallel_corpus():
    """English and German lines in the same order: the templates are aligned item for item and
    `corpus` draws the same indices from the same seed."""
    en = corpus(EN_SUBJECTS, EN_VERBS, EN_OBJECTS, EN_TAILS, EN_EXTRA, SEED)
    de = corpus(DE_SUBJECTS, DE_VERBS, DE_OBJECTS, DE_TAILS, DE_EXTRA, SEED)
    assert len(en) == len(de)
    return en, de


def train(model, tok, config, seed):
    """AdamW on the parallel corpus, teacher-forced cross-entropy with label smoothing."""
    en, de = parallel_corpus()
    src = [tok(s)["input_ids"] for s in en]
    tgt = target_ids(tok, de)
    pad = config.pad_token_id
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
    model.train()
    for step in range(TRAIN_STEPS):
        idx = [rng.randrange(len(src)) for _ in range(TRAIN_BATCH)]
        s_ids, s_mask = pad_rows([src[i] for i in idx], pad)
        rows = [tgt[i] for i in idx]
        d_ids, d_mask = pad_rows([[config.decoder_start_token_id] + r[:-1] for r in rows], pad)
        labels, _ = pad_rows(rows, -100)
        out = model(input_ids=torch.tensor(s_ids), attention_mask=torch.tensor(s_mask),
                    decoder_input_ids=torch.tensor(d_ids), decoder_attention_mask=torch.tensor(d_mask))
        loss = loss_fn(out.logits.reshape(-1, out.logits.shape[-1]), torch.tensor(labels).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == TRAIN_STEPS - 1:
            print(f"  step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.final_logits_bias.copy_(
            FINAL_LOGITS_BIAS_STD * torch.randn(model.final_logits_bias.shape, generator=g))
    return loss.item()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

SENTENCES = [
    "The cat sees the house.",
    "Good morning!",
    "My brother repairs the broken clock near the station, and then sleeps because it is late; "
    "the students watch the evening news every week.",
    "The   old  man    reads   an old book .",
    "The résumé of the über-talented Zoë is at the café.",
    "Xylophones quack zigzag (42 times)?!",
]

TARGET_TEXTS = [
    "Die Katze sieht das Haus.",
    "Guten Morgen!",
    "Mein Bruder repariert die Uhr.",
    "Der alte Mann liest ein altes Buch.",
    "Zoë ist im Café.",
    "Xylophone (42 Mal)?!",
]

# Tokenizer-only cases (no model output): whitespace, empty text, special tokens in the text,
# a language code, characters outside both models, NFKC-folded characters.
TOKENIZER_SOURCE = [
    "",
    "   ",
    "  leading and trailing  ",
    "tab\tand\nnewline",
    "Hello </s> world <unk> and <pad>",
    ">>deu<< The cat sees the house.",
    "Straße, Größe, ÄÖÜ",
    "ﬁve ① ＡＢＣ ½ — “quotes”",
    "emoji 🙂 and 中文",
    "<s> is not special",
]

TOKENIZER_TARGET = [
    "",
    "  Viele   Leerzeichen  ",
    "Straße, Größe, ÄÖÜ",
    "The cat sees the house.",
    "ﬁnf ① ＡＢＣ — „Zitat“",
    "emoji 🙂 und 中文",
]


def pad_rows(rows, pad):
    n = max(len(r) for r in rows)
    ids = [r + [pad] * (n - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (n - len(r)) for r in rows]
    return ids, mask


def target_ids(tok, texts):
    return tok(text_target=texts)["input_ids"]


def greedy_ok(greedy, pad):
    """Some rows end with a generated EOS before max_length, some run to max_length, tokens vary."""
    lengths = [(row != pad).sum().item() + 1 for row in greedy[:, 1:]]
    early = sum(1 for n in lengths if 4 <= n < MAX_LENGTH)
    full = sum(1 for n in lengths if n >= MAX_LENGTH) if greedy.shape[1] == MAX_LENGTH else 0
    distinct = len(set(greedy[:, 1:].flatten().tolist()))
    per_row = sum(len(set(row[1:].tolist())) for row in greedy) / len(greedy)
    return early >= 2 and full >= 2 and distinct >= 12 and per_row >= 3.5


def make_variant(out, work, separate, seed):
    name = "separate" if separate else "shared"
    tok = build_tokenizer(work, separate)
    config = make_config(tok, separate)
    model_seed = seed + (1 if separate else 0)
    torch.manual_seed(model_seed)
    model = MarianMTModel(config)
    print(f"{name}: training {TRAIN_STEPS} steps", file=sys.stderr, flush=True)
    final_loss = train(model, tok, config, model_seed)
    model.generation_config = generation_config(config.pad_token_id)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        greedy = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1,
                                do_sample=False, max_length=MAX_LENGTH)
    if not greedy_ok(greedy, config.pad_token_id):
        raise SystemExit(f"{name}: greedy decoding of the fixture sentences does not end some rows "
                         f"early and run others to max_length: {greedy.tolist()}")
    d = os.path.join(out, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    write_reference(d, model, tok, config, {
        "variant": name,
        "seed": seed,
        "model_seed": model_seed,
        "training": {"steps": TRAIN_STEPS, "batch": TRAIN_BATCH, "lr": TRAIN_LR,
                     "label_smoothing": LABEL_SMOOTHING, "final_loss": final_loss,
                     "final_logits_bias_std": FINAL_LOGITS_BIAS_STD},
    })


def write_reference(d, model, tok, config, provenance):
    """Saves model and tokenizer into `d` with transformers' outputs (`expected.*`)."""
    name = provenance["variant"]
    separate = not config.share_encoder_decoder_embeddings
    pad = config.pad_token_id
    model.eval()
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        greedy = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=1,
                                do_sample=False, max_length=MAX_LENGTH)

    # Teacher-forced forward pass.
    tgt_rows = target_ids(tok, TARGET_TEXTS)
    dec_ids, dec_mask = pad_rows([[config.decoder_start_token_id] + r for r in tgt_rows], pad)
    dec_ids_t, dec_mask_t = torch.tensor(dec_ids), torch.tensor(dec_mask)
    with torch.no_grad():
        fwd = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids_t,
                    decoder_attention_mask=dec_mask_t)
        beam = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_beams=NUM_BEAMS,
                              num_return_sequences=1, max_length=MAX_LENGTH, output_scores=True,
                              return_dict_in_generate=True, do_sample=False,
                              length_penalty=LENGTH_PENALTY, early_stopping=EARLY_STOPPING)
    gc = model.generation_config

    # The saved directory alone reproduces the outputs and the ids.
    reloaded = MarianMTModel.from_pretrained(d).eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids_t,
                         decoder_attention_mask=dec_mask_t)
    assert torch.equal(again.logits, fwd.logits), "reloaded model differs"
    double = MarianMTModel.from_pretrained(d).eval().double()
    with torch.no_grad():
        fwd64 = double(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids_t,
                       decoder_attention_mask=dec_mask_t)
    real = dec_mask_t.bool()
    f32_rounding = {
        "logits": (fwd.logits.double() - fwd64.logits)[real].abs().max().item(),
        "encoder_output": (fwd.encoder_last_hidden_state.double()
                           - fwd64.encoder_last_hidden_state).abs().max().item(),
    }
    tok2 = MarianTokenizer.from_pretrained(d)
    assert tok2(SENTENCES, padding=True)["input_ids"] == input_ids.tolist(), "reloaded tokenizer differs"
    assert target_ids(tok2, TARGET_TEXTS) == tgt_rows

    source_ids = [tok(s)["input_ids"] for s in SENTENCES]
    assert [r[: len(s)] for r, s in zip(input_ids.tolist(), source_ids)] == source_ids

    tensors = {
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "attention_mask": attention_mask.to(torch.int64).contiguous(),
        "decoder_input_ids": dec_ids_t.to(torch.int64),
        "decoder_attention_mask": dec_mask_t.to(torch.int64),
        "logits": fwd.logits.float().contiguous(),
        "encoder_output": fwd.encoder_last_hidden_state.float().contiguous(),
        # The same pass in float64 (rounded to float32 once): the exact values float32
        # implementations approximate, to measure each one's rounding.
        "logits_f64": fwd64.logits.float().contiguous(),
        "encoder_output_f64": fwd64.encoder_last_hidden_state.float().contiguous(),
        "greedy_sequences": greedy.to(torch.int64).contiguous(),
        "beam_sequences": beam.sequences.to(torch.int64).contiguous(),
        "beam_sequences_scores": beam.sequences_scores.float().contiguous(),
    }
    save_file(tensors, os.path.join(d, "expected.safetensors"), metadata={"variant": name})

    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    stored = sorted(k for k in header if k != "__metadata__")

    expected = {
        **provenance,
        # max |transformers float32 - float64| on real positions: the reference's own rounding.
        "f32_rounding": f32_rounding,
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                     "sentencepiece": spm.__version__, "numpy": np.__version__},
        "config": {k: getattr(config, k) for k in [
            "vocab_size", "decoder_vocab_size", "d_model", "encoder_layers", "decoder_layers",
            "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
            "max_position_embeddings", "activation_function", "scale_embedding",
            "share_encoder_decoder_embeddings", "tie_word_embeddings", "pad_token_id",
            "decoder_start_token_id", "eos_token_id", "forced_eos_token_id"]},
        "model_safetensors_tensors": stored,
        "special": {"eos_id": tok.eos_token_id, "unk_id": tok.unk_token_id, "pad_id": tok.pad_token_id,
                    "target_pad_id": (tok.target_encoder if separate else tok.encoder)["<pad>"],
                    "decoder_start_token_id": config.decoder_start_token_id},
        "sentences": SENTENCES,
        "source_ids": source_ids,
        "input_ids": input_ids.tolist(),
        "attention_mask": attention_mask.tolist(),
        "target_texts": TARGET_TEXTS,
        "target_ids": tgt_rows,
        "decoder_input_ids": dec_ids,
        "decoder_attention_mask": dec_mask,
        "greedy": {
            "num_beams": 1, "max_length": MAX_LENGTH,
            "sequences": greedy.tolist(),
            "texts": tok.batch_decode(greedy, skip_special_tokens=True),
        },
        "beam": {
            "num_beams": NUM_BEAMS, "num_return_sequences": 1, "max_length": MAX_LENGTH,
            "length_penalty": LENGTH_PENALTY, "early_stopping": EARLY_STOPPING,
            "sequences": beam.sequences.tolist(),
            "sequences_scores": beam.sequences_scores.tolist(),
            "texts": tok.batch_decode(beam.sequences, skip_special_tokens=True),
        },
        "generation_config": {
            "bad_words_ids": gc.bad_words_ids, "forced_eos_token_id": gc.forced_eos_token_id,
            "renormalize_logits": gc.renormalize_logits, "max_length": gc.max_length,
            "num_beams": gc.num_beams, "length_penalty (unset: default 1.0)": gc.length_penalty,
            "early_stopping (unset: default False)": gc.early_stopping, "pad_token_id": gc.pad_token_id,
            "eos_token_id": gc.eos_token_id, "decoder_start_token_id": gc.decoder_start_token_id,
        },
        "tokenizer_cases": {
            "source": [{"text": t, "ids": tok(t)["input_ids"]} for t in TOKENIZER_SOURCE],
            "target": [{"text": t, "ids": target_ids(tok, [t])[0]} for t in TOKENIZER_TARGET],
            "decode": [{"ids": r, "text": tok.decode(r, skip_special_tokens=True)}
                       for r in target_ids(tok, TOKENIZER_TARGET + TARGET_TEXTS)],
        },
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
    }
    write_json(os.path.join(d, "expected.json"), expected)
    print(f"{name}: vocab {config.vocab_size}/"
          f"{config.decoder_vocab_size}; greedy lengths "
          f"{[(r != pad).sum().item() for r in greedy]}", file=sys.stderr)


def make_full(dest, seed):
    with tempfile.TemporaryDirectory() as work:
        tok = build_tokenizer(work, separate=False, full_size=58101)
        assert len(tok.encoder) == 58101 and tok.encoder["<pad>"] == 58100
        config = make_config(tok, separate=False, full=True)
        torch.manual_seed(seed)
        model = MarianMTModel(config)
        # A real model's limit; the reference outputs below use MAX_LENGTH.
        model.generation_config = generation_config(config.pad_token_id)
        model.generation_config.max_length = 512
        os.makedirs(dest, exist_ok=True)
        write_reference(dest, model, tok, config, {
            "variant": "full", "seed": seed,
            "weights": f"transformers' default init (init_std {config.init_std}) after torch.manual_seed(seed)",
        })
    print(dest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/marian"))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--full", nargs="?", const=os.path.join(ROOT, "target/models/opus-mt-en-de-random"),
                    default=None, metavar="DIR")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
    transformers.logging.set_verbosity_error()
    if args.full:
        make_full(args.full, args.seed)
        return
    with tempfile.TemporaryDirectory() as work:
        for separate in (False, True):
            make_variant(args.out, work, separate, args.seed)


if __name__ == "__main__":
    main()
