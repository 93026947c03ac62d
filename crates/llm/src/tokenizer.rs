//! The tokenizer a GGUF file describes, rebuilt with the `tokenizers` crate.
//!
//! Two kinds (`tokenizer.ggml.model`): byte-level BPE (`gpt2`: SmolLM2, qwen2) and SentencePiece
//! BPE (`llama`: gemma), each matching what llama.cpp does with the same metadata; control tokens
//! (type 3) are special tokens, user-defined ones (type 4) are matched before the model runs.

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper};
use tokenizers::{NormalizerWrapper, SplitDelimiterBehavior};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects BOS in front of a text (llama.cpp's `add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// Tokens that end a reply: EOS and the chat formats' end-of-turn markers in the vocabulary.
    pub stop_tokens: Vec<u32>,
}

/// End-of-turn markers of the chat formats we know (ChatML, Gemma, Llama 3).
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>"];

/// A metadata array, each element converted by `convert` (`what` names the element type).
fn array<T>(
    v: &Value,
    key: &str,
    what: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>> {
    let arr = v
        .to_vec()
        .map_err(|_| LlmError::Metadata(format!("'{key}' is not an array")))?;
    arr.iter()
        .map(|x| {
            convert(x).ok_or_else(|| LlmError::Metadata(format!("'{key}' holds a non-{what}")))
        })
        .collect()
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    array(v, key, "string", |x| x.to_string().ok().cloned())
}

fn floats(v: &Value, key: &str) -> Result<Vec<f32>> {
    array(v, key, "f32", |x| x.to_f32().ok())
}

fn ints(v: &Value, key: &str) -> Result<Vec<i32>> {
    array(v, key, "i32", |x| x.to_i32().ok())
}

/// Byte-level BPE (`gpt2`): vocabulary and merges from the metadata, the pre-tokenizer that
/// matches llama.cpp's `tokenizer.ggml.pre`.
fn byte_level_bpe(gguf: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let merges = strings(
        gguf.value("tokenizer.ggml.merges")?,
        "tokenizer.ggml.merges",
    )?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| LlmError::Tokenizer(format!("merge '{m}' has no space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;

    let pre = if gguf.has("tokenizer.ggml.pre") {
        gguf.string("tokenizer.ggml.pre")?
    } else {
        "default".to_string()
    };
    let byte_level = ByteLevel::new(false, false, true);
    // llama.cpp's regexes per `pre`: "smollm" splits every digit first, then GPT-2's split;
    // "qwen2" is its own regex (digits one by one, letters with one leading non-letter).
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "default" | "gpt2" => byte_level.into(),
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into()
        }
        other => {
            return Err(LlmError::Tokenizer(format!(
                "pre-tokenizer '{other}' is not supported (supported: smollm, gpt2, qwen2, \
                 default)"
            )))
        }
    };
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(inner)
}

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2` split.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece BPE (`llama`: gemma, Llama 2): no merges in the file, only scores. llama.cpp
/// merges the adjacent pair whose concatenation is the vocabulary entry of highest score; that
/// is BPE whose merge ranks follow the scores of the merged tokens, so the merges are rebuilt
/// from every split of every normal token into two vocabulary entries. Spaces become `▁`,
/// characters outside the vocabulary fall back to byte tokens `<0xXX>`.
fn sentencepiece_bpe(
    gguf: &GgufFile,
    tokens: &[String],
    types: &[i32],
) -> Result<tokenizers::Tokenizer> {
    let scores = floats(
        gguf.value("tokenizer.ggml.scores")?,
        "tokenizer.ggml.scores",
    )?;
    if scores.len() != tokens.len() {
        return Err(LlmError::Tokenizer(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let index: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // (score of the merged token, its id, left, right)
    let mut merges: Vec<(f32, u32, &str, &str)> = Vec::new();
    for (id, text) in tokens.iter().enumerate() {
        if types[id] != TOKEN_TYPE_NORMAL || index.get(text.as_str()) != Some(&(id as u32)) {
            continue;
        }
        for (cut, _) in text.char_indices().skip(1) {
            let (left, right) = text.split_at(cut);
            if index.contains_key(left) && index.contains_key(right) {
                merges.push((scores[id], id as u32, left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab =
        index.iter().map(|(&t, &i)| (t.to_string(), i)).collect();
    let unk = if gguf.has("tokenizer.ggml.unknown_token_id") {
        let id = gguf.usize("tokenizer.ggml.unknown_token_id")?;
        tokens.get(id).cloned()
    } else {
        None
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    let space_prefix = match gguf.content.metadata.get("tokenizer.ggml.add_space_prefix") {
        Some(v) => v
            .to_bool()
            .map_err(|_| LlmError::Metadata("add_space_prefix not a bool".into()))?,
        None => true,
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if space_prefix {
        normalizers.push(Prepend::new("\u{2581}".into()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    normalizers.push(
        Replace::new(" ", "\u{2581}")
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?
            .into(),
    );
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        let tokens = strings(
            gguf.value("tokenizer.ggml.tokens")?,
            "tokenizer.ggml.tokens",
        )?;
        let types = match gguf.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => ints(v, "tokenizer.ggml.token_type")?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(LlmError::Tokenizer(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut inner = match model.as_str() {
            "gpt2" => byte_level_bpe(gguf, &tokens)?,
            "llama" => sentencepiece_bpe(gguf, &tokens, &types)?,
            other => {
                return Err(LlmError::Tokenizer(format!(
                    "tokenizer model '{other}' is not supported (supported: gpt2 byte-level \
                     BPE, llama SentencePiece BPE)"
                )))
            }
        };
        // Control tokens are special (recognised in text, skipped when decoding); user-defined
        // ones (gemma: runs of newlines or spaces, HTML tags) are matched in the raw text
        // before the model sees it, as llama.cpp does.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| {
                AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;

        let id = |key: &str| -> Result<Option<u32>> {
            if gguf.has(key) {
                Ok(Some(gguf.usize(key)? as u32))
            } else {
                Ok(None)
            }
        };
        let add_bos = match gguf.content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|_| LlmError::Metadata("add_bos_token not a bool".into()))?,
            None => false,
        };
        let chat_template = if gguf.has("tokenizer.chat_template") {
            Some(gguf.string("tokenizer.chat_template")?)
        } else {
            None
        };
        let vocab = inner.get_vocab_size(true);
        let special = |key: &str| -> Result<Option<u32>> {
            match id(key)? {
                Some(t) if t as usize >= vocab => Err(LlmError::Metadata(format!(
                    "{key} is {t}, outside the vocabulary of {vocab} tokens"
                ))),
                other => Ok(other),
            }
        };
        let eos = special("tokenizer.ggml.eos_token_id")?;
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let mut stop_tokens: Vec<u32> = eos.into_iter().collect();
        stop_tokens.extend(END_OF_TURN.iter().filter_map(|t| inner.token_to_id(t)));
        stop_tokens.dedup();
        Ok(Self {
            inner,
            bos,
            eos,
            stop_tokens,
            add_bos,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; control tokens written in the text are recognised. BOS is prepended
    /// when the model asks for it and `with_bos` is set, unless the text already starts with it
    /// (chat templates that render `bos_token`).
    pub fn encode(&self, text: &str, with_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if with_bos && self.add_bos {
            if let Some(b) = self.bos {
                if enc.get_ids().first() != Some(&b) {
                    ids.push(b);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Renders the model's chat template for one user message, ready for the reply.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat(&[ChatMessage {
            role: "user".into(),
            content: user.into(),
        }])
    }

    /// Renders the model's chat template for a conversation, ready for the assistant's reply.
    pub fn chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| LlmError::Template("the model has no tokenizer.chat_template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template)
            .map_err(|e| LlmError::Template(e.to_string()))?;
        let bos = self
            .bos
            .and_then(|b| self.token_text(b))
            .unwrap_or_default();
        let eos = self
            .eos
            .and_then(|b| self.token_text(b))
            .unwrap_or_default();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
            })
            .map_err(|e| LlmError::Template(e.to_string()))
    }
}

/// One turn of a conversation, as chat templates read it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Incremental detokenizer: yields text as soon as it forms whole characters. Each step decodes
/// only the ids since the last piece (and the one before, for context), as Hugging Face's
/// text-generation-inference does, so a long generation costs linear, not quadratic, time.
#[derive(Clone, Debug, Default)]
pub struct TokenStream {
    ids: Vec<u32>,
    /// Decoding restarts here (the token before the last piece: keeps its leading space).
    prefix: usize,
    /// Ids up to here have been emitted.
    read: usize,
}

impl TokenStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text `id` adds, or "" while a multi-byte character is still incomplete.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        // A trailing U+FFFD means a multi-byte character is still incomplete: wait for more, up
        // to the 4 bytes a character can take (past that the bytes are invalid and stay so).
        let waiting = self.ids.len() - self.read;
        if now.len() <= before.len() || (now.ends_with('\u{FFFD}') && waiting < 4) {
            return Ok(String::new());
        }
        // Invalid bytes already emitted as U+FFFD can decode differently once more bytes follow:
        // what was emitted stays, and the new text starts where the two decodings part.
        let same = now
            .char_indices()
            .zip(before.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(now[same..].to_string())
    }
}
