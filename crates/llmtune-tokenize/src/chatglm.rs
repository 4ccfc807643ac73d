//! ChatGLM tokenizers: ChatGLM-6B (v1), ChatGLM2-6B (v2) and ChatGLM3-6B (v3).
//!
//! All three are SentencePiece models wrapped by THUDM's `tokenization_chatglm.py`, run under
//! transformers 4.33. This module reproduces that Python behaviour exactly:
//!
//! * **Encoding** uses [`kitoken`] (pure Rust) on the `.model` file. v1 first rewrites the text
//!   like its `SPTokenizer._preprocess`: `\n` → `<n>`, `\t` → `<|tab|>`, runs of 80..2 spaces →
//!   `<|blank_n|>` (longest first). v1 ids are piece ids plus `num_image_tokens`
//!   (`tokenizer_config.json`, 20000 when absent). v2/v3 append their command tokens
//!   (`[MASK] [gMASK] [sMASK] sop eop`, v3 also `<|system|> <|user|> <|assistant|>
//!   <|observation|>`) after the pieces.
//! * **Special tokens** (`build_inputs_with_special_tokens`): v1 appends `[gMASK] <sop>` (a pair:
//!   `A [gMASK] <sop> B <eop>`); v2/v3 prepend `[gMASK] sop` (a pair: `[gMASK] sop A B </s>`).
//! * **Decoding** follows transformers' slow-tokenizer `_decode`: ids → tokens
//!   (`convert_ids_to_tokens`, dropping `all_special_ids` when skipping specials; v1 drops pad
//!   ids first), then SentencePiece's `DecodePieces` (re-implemented here from the C++ source,
//!   bos-whitespace rule and byte pieces included), then v1's `<n>`/tab/blank post-processing
//!   and `clean_up_tokenization`. v2 turns its command tokens and `<s> </s> <unk>` into empty
//!   tokens; v3 writes its command tokens out literally, even with `skip_special_tokens`
//!   (v2/v3 register no special tokens with transformers).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kitoken::{Kitoken, Normalization, SpecialTokenKind};
use sentencepiece_model::{SentencePieceModel, Type};
use sha2::{Digest, Sha256};

use crate::{Result, TokenizerError};

/// Which ChatGLM tokenizer a model folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatGlmVersion {
    /// ChatGLM-6B: `ice_text.model`, `[gMASK] <sop>` appended.
    V1,
    /// ChatGLM2-6B: `tokenizer.model`, `[gMASK] sop` prepended.
    V2,
    /// ChatGLM3-6B: v2 plus the role tokens `<|system|>` ... `<|observation|>`.
    V3,
}

impl ChatGlmVersion {
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "chatglm-v1",
            Self::V2 => "chatglm-v2",
            Self::V3 => "chatglm-v3",
        }
    }
}

/// The command tokens v2 appends after the SentencePiece pieces (ids `n_pieces + i`).
pub const V2_COMMAND_TOKENS: [&str; 5] = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"];
/// The command tokens v3 appends after the SentencePiece pieces (ids `n_pieces + i`).
pub const V3_COMMAND_TOKENS: [&str; 9] = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];

/// v1's longest `<|blank_n|>` token (`SPTokenizer.max_blank_length`).
const V1_MAX_BLANK: usize = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// v1's special token strings (`tokenizer_config.json`, with the constructor's defaults).
#[derive(Debug, Clone)]
struct V1Tokens {
    bos: u32,
    eos: u32,
    gmask: u32,
    pad: u32,
    /// transformers' `all_special_ids`: bos, eos, unk, pad, mask.
    all_special: Vec<u32>,
}

/// One message of a ChatGLM3 conversation (`build_chat_input`'s history item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `observation`.
    pub role: String,
    /// The message text (for a system message with tools, already with the tools' JSON).
    pub content: String,
    /// The text after the role token before the newline (`""` for plain messages).
    pub metadata: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            metadata: String::new(),
        }
    }
}

/// A ChatGLM tokenizer (see the module docs for the exact rules of each version).
pub struct ChatGlmTokenizer {
    version: ChatGlmVersion,
    model_file: PathBuf,
    sha256: String,
    encoder: Kitoken,
    pieces: Vec<String>,
    kinds: Vec<PieceKind>,
    piece_ids: HashMap<String, u32>,
    unk_piece_id: u32,
    unk_surface: String,
    /// `add_dummy_prefix || remove_extra_whitespaces`: decode strips the first `▁`.
    strip_bos_ws: bool,
    remove_extra_whitespaces: bool,
    /// v1 only: ids below this are image tokens.
    num_image_tokens: u32,
    do_lower_case: bool,
    remove_space: bool,
    clean_up_tokenization_spaces: bool,
    v1: Option<V1Tokens>,
    /// v2/v3 command tokens, ids `pieces.len() + i`.
    commands: Vec<&'static str>,
    sp_bos: u32,
    sp_eos: u32,
}

impl std::fmt::Debug for ChatGlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatGlmTokenizer")
            .field("version", &self.version)
            .field("model_file", &self.model_file)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn invalid(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn config_str(cfg: &serde_json::Value, key: &str, default: &str) -> String {
    cfg.get(key)
        .and_then(crate::token_string)
        .unwrap_or_else(|| default.to_string())
}

fn config_bool(cfg: &serde_json::Value, key: &str, default: bool) -> bool {
    cfg.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
}

/// Python's `str.isspace` (Unicode White_Space plus the ASCII separators `\x1c`..`\x1f`).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

fn is_cjk(c: char) -> bool {
    ('\u{4e00}'..='\u{9fff}').contains(&c)
}

/// The model's `process_response` for a decoded reply.
///
/// v1 (ChatGLM-6B `modeling_chatglm.py`): strip, `[[训练时间]]` → `2023年`, then each ASCII
/// `, ! : ; ?` directly after or directly before a CJK character (U+4E00..U+9FFF) becomes its
/// full-width form (the two `re.sub` passes of the reference, in its order). v2/v3: strip and
/// `[[训练时间]]` → `2023年`.
pub fn process_response(version: ChatGlmVersion, response: &str) -> String {
    let response = py_strip(response).replace("[[训练时间]]", "2023年");
    if version != ChatGlmVersion::V1 {
        return response;
    }
    let mut chars: Vec<char> = response.chars().collect();
    for (ascii, full) in [
        (',', '，'),
        ('!', '！'),
        (':', '：'),
        (';', '；'),
        ('?', '？'),
    ] {
        // re.sub(r"([CJK])p", r"\1P"): a match consumes both characters.
        let mut i = 0;
        while i + 1 < chars.len() {
            if is_cjk(chars[i]) && chars[i + 1] == ascii {
                chars[i + 1] = full;
                i += 2;
            } else {
                i += 1;
            }
        }
        // re.sub(r"p([CJK])", r"P\1").
        let mut i = 0;
        while i + 1 < chars.len() {
            if chars[i] == ascii && is_cjk(chars[i + 1]) {
                chars[i] = full;
                i += 2;
            } else {
                i += 1;
            }
        }
    }
    chars.into_iter().collect()
}

/// transformers' `PreTrainedTokenizerBase.clean_up_tokenization`.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// v1's `SPTokenizer._preprocess`.
fn v1_preprocess(text: &str) -> String {
    let mut t = text.replace('\n', "<n>").replace('\t', "<|tab|>");
    for i in (2..=V1_MAX_BLANK).rev() {
        let run = " ".repeat(i);
        if t.contains(&run) {
            t = t.replace(&run, &format!("<|blank_{i}|>"));
        }
    }
    t
}

/// v1's `SPTokenizer.postprocess` (decode side).
fn v1_postprocess(text: &str) -> String {
    let mut t = text.replace("<n>", "\n").replace("<|tab|>", "\t");
    for i in 2..=V1_MAX_BLANK {
        let tok = format!("<|blank_{i}|>");
        if t.contains(&tok) {
            t = t.replace(&tok, &" ".repeat(i));
        }
    }
    t
}

/// Decodes one UTF-8 character at the start of `bytes`: its length, or `None` when the
/// leading bytes are not a valid sequence (SentencePiece then emits U+FFFD for one byte).
fn utf8_char_len(bytes: &[u8]) -> Option<usize> {
    let want = match bytes[0] {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    if bytes.len() < want {
        return None;
    }
    std::str::from_utf8(&bytes[..want]).ok().map(|_| want)
}

/// Builds the kitoken encoder. SentencePiece normalizes with the model's precompiled
/// charsmap whenever it has one, whatever the normalizer's name; kitoken instead maps the
/// names `nmt_nfkc`/`nfkc`/... to its own Unicode NFKC, which differs from the charsmap of
/// ChatGLM-6B's `ice_text.model` (e.g. for U+FF5E `～`). So the named Unicode/NMT/case-fold
/// steps are replaced by the charsmap itself.
fn build_encoder(bytes: &[u8], proto: &SentencePieceModel) -> std::result::Result<Kitoken, String> {
    let mut def = kitoken::convert::convert_sentencepiece(bytes).map_err(|e| e.to_string())?;
    if let Some(n) = proto.normalizer() {
        let map = n.precompiled_charsmap();
        if !map.is_empty() && n.name() != "user_defined" {
            let map = kitoken::CharsMap::try_from(map).map_err(|e| e.to_string())?;
            def.config.normalization.retain(|x| {
                !matches!(
                    x,
                    Normalization::Unicode { .. }
                        | Normalization::NMT
                        | Normalization::CaseFold { .. }
                )
            });
            def.config
                .normalization
                .insert(0, Normalization::CharsMap { map });
        }
    }
    Kitoken::try_from(def).map_err(|e| e.to_string())
}

impl ChatGlmTokenizer {
    /// Detects a ChatGLM tokenizer in a model folder: `ice_text.model` (v1), or
    /// `tokenizer.model` whose `tokenizer_config.json` names `ChatGLMTokenizer` (v2, or v3 when
    /// the folder's `tokenization_chatglm.py` has the role tokens or a config names
    /// `chatglm3`). Returns `None` when the folder holds no ChatGLM tokenizer.
    pub fn detect(dir: &Path) -> Result<Option<ChatGlmVersion>> {
        if dir.join("ice_text.model").is_file() {
            return Ok(Some(ChatGlmVersion::V1));
        }
        if !dir.join("tokenizer.model").is_file() {
            return Ok(None);
        }
        let mut is_glm = false;
        let mut names = String::new();
        for f in ["tokenizer_config.json", "config.json"] {
            let p = dir.join(f);
            if !p.is_file() {
                continue;
            }
            let v = crate::read_json(&p)?;
            if v.get("tokenizer_class").and_then(|x| x.as_str()) == Some("ChatGLMTokenizer")
                || v.get("model_type").and_then(|x| x.as_str()) == Some("chatglm")
            {
                is_glm = true;
            }
            for k in ["name_or_path", "_name_or_path"] {
                if let Some(s) = v.get(k).and_then(|x| x.as_str()) {
                    names.push_str(s);
                    names.push('\n');
                }
            }
        }
        if !is_glm {
            return Ok(None);
        }
        let code = dir.join("tokenization_chatglm.py");
        let v3_code = std::fs::read_to_string(&code)
            .map(|s| s.contains("<|observation|>"))
            .unwrap_or(false);
        if v3_code || names.to_lowercase().contains("chatglm3") {
            Ok(Some(ChatGlmVersion::V3))
        } else {
            Ok(Some(ChatGlmVersion::V2))
        }
    }

    /// Loads the tokenizer of `version` from a folder (`ice_text.model` for v1,
    /// `tokenizer.model` otherwise, plus `tokenizer_config.json` when present).
    pub fn from_dir(dir: impl AsRef<Path>, version: ChatGlmVersion) -> Result<Self> {
        let dir = dir.as_ref();
        let model = match version {
            ChatGlmVersion::V1 => dir.join("ice_text.model"),
            _ => dir.join("tokenizer.model"),
        };
        let tc = dir.join("tokenizer_config.json");
        let cfg = if tc.is_file() {
            crate::read_json(&tc)?
        } else {
            serde_json::Value::Object(Default::default())
        };
        Self::from_model_file(&model, version, &cfg)
    }

    /// Loads a SentencePiece model file with the given `tokenizer_config.json` contents.
    pub fn from_model_file(
        model_file: &Path,
        version: ChatGlmVersion,
        config: &serde_json::Value,
    ) -> Result<Self> {
        let bytes = std::fs::read(model_file).map_err(|source| TokenizerError::Io {
            path: model_file.to_path_buf(),
            source,
        })?;
        let sha256: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let proto = SentencePieceModel::from_slice(&bytes)
            .map_err(|e| invalid(model_file, format!("not a SentencePiece model: {e}")))?;
        let encoder = build_encoder(&bytes, &proto)
            .map_err(|e| invalid(model_file, format!("SentencePiece conversion failed: {e}")))?;
        let mut pieces = Vec::with_capacity(proto.pieces().len());
        let mut kinds = Vec::with_capacity(proto.pieces().len());
        let mut piece_ids = HashMap::with_capacity(proto.pieces().len());
        for (i, p) in proto.pieces().iter().enumerate() {
            let text = p.piece().to_string();
            let kind = match p.r#type() {
                Type::Normal => PieceKind::Normal,
                Type::Unknown => PieceKind::Unknown,
                Type::Control => PieceKind::Control,
                Type::UserDefined => PieceKind::UserDefined,
                Type::Unused => PieceKind::Unused,
                Type::Byte => PieceKind::Byte,
            };
            piece_ids.entry(text.clone()).or_insert(i as u32);
            pieces.push(text);
            kinds.push(kind);
        }
        let trainer = proto
            .trainer()
            .ok_or_else(|| invalid(model_file, "no trainer_spec"))?;
        let unk_piece_id = trainer.unk_id() as u32;
        if kinds.get(unk_piece_id as usize) != Some(&PieceKind::Unknown) {
            return Err(invalid(
                model_file,
                format!("unk_id {unk_piece_id} is not an unknown piece"),
            ));
        }
        let (add_dummy_prefix, remove_extra_whitespaces) = proto
            .normalizer()
            .map(|n| (n.add_dummy_prefix(), n.remove_extra_whitespaces()))
            .unwrap_or((true, true));
        if let Some(d) = proto.denormalizer() {
            if !d.precompiled_charsmap().is_empty() {
                return Err(invalid(
                    model_file,
                    "SentencePiece denormalizer rules are not supported",
                ));
            }
        }
        let sp_bos = trainer.bos_id().max(0) as u32;
        let sp_eos = trainer.eos_id().max(0) as u32;
        let mut tok = Self {
            version,
            model_file: model_file.to_path_buf(),
            sha256,
            encoder,
            pieces,
            kinds,
            piece_ids,
            unk_piece_id,
            unk_surface: trainer.unk_surface().to_string(),
            strip_bos_ws: add_dummy_prefix || remove_extra_whitespaces,
            remove_extra_whitespaces,
            num_image_tokens: 0,
            do_lower_case: false,
            remove_space: false,
            clean_up_tokenization_spaces: false,
            v1: None,
            commands: vec![],
            sp_bos,
            sp_eos,
        };
        match version {
            ChatGlmVersion::V1 => {
                tok.num_image_tokens = match config.get("num_image_tokens") {
                    None => 20000,
                    Some(v) => v.as_u64().ok_or_else(|| {
                        invalid(model_file, "tokenizer_config.json: num_image_tokens")
                    })? as u32,
                };
                tok.do_lower_case = config_bool(config, "do_lower_case", false);
                tok.remove_space = config_bool(config, "remove_space", false);
                tok.clean_up_tokenization_spaces =
                    config_bool(config, "clean_up_tokenization_spaces", true);
                let id = |t: &Self, key: &str, default: &str| {
                    let s = config_str(config, key, default);
                    t.v1_token_to_id(&s)
                };
                let bos = id(&tok, "bos_token", "<sop>");
                let eos = id(&tok, "eos_token", "<eop>");
                let unk = id(&tok, "unk_token", "<unk>");
                let pad = id(&tok, "pad_token", "<pad>");
                let mask = id(&tok, "mask_token", "[MASK]");
                let gmask = id(&tok, "gmask_token", "[gMASK]");
                let mut all_special = vec![bos, eos, unk, pad, mask];
                all_special.sort_unstable();
                all_special.dedup();
                tok.v1 = Some(V1Tokens {
                    bos,
                    eos,
                    gmask,
                    pad,
                    all_special,
                });
            }
            ChatGlmVersion::V2 => {
                tok.commands = V2_COMMAND_TOKENS.to_vec();
                tok.clean_up_tokenization_spaces =
                    config_bool(config, "clean_up_tokenization_spaces", false);
            }
            ChatGlmVersion::V3 => {
                tok.commands = V3_COMMAND_TOKENS.to_vec();
                tok.clean_up_tokenization_spaces =
                    config_bool(config, "clean_up_tokenization_spaces", false);
            }
        }
        Ok(tok)
    }

    pub fn version(&self) -> ChatGlmVersion {
        self.version
    }

    /// The SentencePiece model file.
    pub fn model_file(&self) -> &Path {
        &self.model_file
    }

    /// Whether decode applies transformers' `clean_up_tokenization` (v1 by default).
    pub fn clean_up_tokenization_spaces(&self) -> bool {
        self.clean_up_tokenization_spaces
    }

    /// sha256 (hex) of the model file.
    pub fn model_sha256(&self) -> &str {
        &self.sha256
    }

    /// A string identifying the tokenizer's behaviour (for cache keys).
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{}|img={}|lower={}|rmspace={}|cleanup={}",
            self.version.name(),
            self.sha256,
            self.num_image_tokens,
            self.do_lower_case,
            self.remove_space,
            self.clean_up_tokenization_spaces
        )
    }

    /// `vocab_size` of the Python tokenizer (pieces + image tokens for v1, pieces + command
    /// tokens for v2/v3).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len() + self.num_image_tokens as usize + self.commands.len()
    }

    fn piece_to_id_or_unk(&self, piece: &str) -> u32 {
        self.piece_ids
            .get(piece)
            .copied()
            .unwrap_or(self.unk_piece_id)
    }

    /// v1's `sp_tokenizer[token]`.
    fn v1_token_to_id(&self, token: &str) -> u32 {
        if let Some(n) = token
            .strip_prefix("<image_")
            .and_then(|r| r.strip_suffix('>'))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
        {
            return n;
        }
        self.piece_to_id_or_unk(token) + self.num_image_tokens
    }

    /// The id of a command token (`[gMASK]`, `sop`, `<|user|>`, v1 `<sop>` ...).
    pub fn command_id(&self, token: &str) -> Option<u32> {
        if let Some(i) = self.commands.iter().position(|c| *c == token) {
            return Some((self.pieces.len() + i) as u32);
        }
        None
    }

    /// Token string → id; `None` when the token is not in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self.version {
            ChatGlmVersion::V1 => {
                if token.starts_with("<image_") {
                    let id = self.v1_token_to_id(token);
                    if id < self.num_image_tokens {
                        return Some(id);
                    }
                }
                self.piece_ids.get(token).map(|i| i + self.num_image_tokens)
            }
            _ => self
                .command_id(token)
                .or_else(|| self.piece_ids.get(token).copied()),
        }
    }

    /// Id → token string (v2/v3 command tokens by name); `None` when out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self.version {
            ChatGlmVersion::V1 => {
                if id < self.num_image_tokens {
                    return Some(format!("<image_{id}>"));
                }
                self.pieces
                    .get((id - self.num_image_tokens) as usize)
                    .cloned()
            }
            _ => {
                let n = self.pieces.len() as u32;
                if id >= n {
                    self.commands.get((id - n) as usize).map(|s| s.to_string())
                } else {
                    self.pieces.get(id as usize).cloned()
                }
            }
        }
    }

    /// Special ids: v1 `<sop>` (bos), `<eop>` (eos), `<pad>`; v2/v3 eos `</s>` (2), pad
    /// `<unk>` (0), no bos. Stop ids add `<|user|>` and `<|observation|>` for v3, as its
    /// `chat` does.
    pub fn special_tokens(&self) -> crate::SpecialTokens {
        match &self.v1 {
            Some(v1) => crate::SpecialTokens {
                bos: Some(v1.bos),
                eos: Some(v1.eos),
                pad: Some(v1.pad),
                stop: vec![v1.eos],
            },
            None => {
                let mut stop = vec![self.sp_eos];
                for t in ["<|user|>", "<|observation|>"] {
                    if let Some(id) = self.command_id(t) {
                        stop.push(id);
                    }
                }
                crate::SpecialTokens {
                    bos: None,
                    eos: Some(self.sp_eos),
                    pad: Some(self.unk_piece_id),
                    stop,
                }
            }
        }
    }

    /// transformers' `all_special_ids` (empty for v2/v3, which register none).
    pub fn all_special_ids(&self) -> &[u32] {
        match &self.v1 {
            Some(v1) => &v1.all_special,
            None => &[],
        }
    }

    /// Whether `id` is a special token: v1 control pieces and `all_special_ids`; v2/v3 the
    /// command tokens and `<unk> <s> </s>`.
    pub fn is_special(&self, id: u32) -> bool {
        match &self.v1 {
            Some(v1) => {
                v1.all_special.contains(&id)
                    || id
                        .checked_sub(self.num_image_tokens)
                        .and_then(|p| self.kinds.get(p as usize))
                        .is_some_and(|k| *k == PieceKind::Control)
            }
            None => {
                id >= self.pieces.len() as u32 && (id as usize) < self.vocab_size()
                    || id == self.sp_bos
                    || id == self.sp_eos
                    || id == self.unk_piece_id
            }
        }
    }

    /// The SentencePiece pieces of `text` (the reference's `tokenizer.tokenize`).
    pub fn tokenize(&self, text: &str) -> Result<Vec<String>> {
        let ids = self.sp_encode(text)?;
        Ok(ids
            .into_iter()
            .map(|i| self.pieces[i as usize].clone())
            .collect())
    }

    /// SentencePiece piece ids of `text` after the version's preprocessing.
    fn sp_encode(&self, text: &str) -> Result<Vec<u32>> {
        let prepared;
        let text = if self.version == ChatGlmVersion::V1 {
            let mut t = if self.remove_space {
                py_strip(text)
                    .split(py_isspace)
                    .filter(|w| !w.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                text.to_string()
            };
            if self.do_lower_case {
                t = t.to_lowercase();
            }
            prepared = v1_preprocess(&t);
            prepared.as_str()
        } else {
            text
        };
        if text.is_empty() {
            return Ok(vec![]);
        }
        let ids = self
            .encoder
            .encode(text, &[SpecialTokenKind::Priority][..])
            .map_err(|e| TokenizerError::Run(format!("{}: {e}", self.version.name())))?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.pieces.len()) {
            return Err(TokenizerError::Run(format!(
                "{}: encoder produced id {bad} outside the model's {} pieces",
                self.version.name(),
                self.pieces.len()
            )));
        }
        // With remove_extra_whitespaces, SentencePiece returns no pieces when the normalized
        // text is empty (whitespace only); kitoken still emits the dummy-prefix `▁`.
        if self.remove_extra_whitespaces
            && ids.len() == 1
            && self.pieces[ids[0] as usize] == "\u{2581}"
        {
            return Ok(vec![]);
        }
        Ok(self.fix_byte_order(ids))
    }

    /// The byte value of a byte piece (`<0xAB>`).
    fn piece_byte(&self, id: u32) -> Option<u8> {
        if self.kinds[id as usize] != PieceKind::Byte {
            return None;
        }
        let p = &self.pieces[id as usize];
        p.strip_prefix("<0x")
            .and_then(|r| r.strip_suffix('>'))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
    }

    /// kitoken 0.11.1's Unigram encoder emits the byte-fallback pieces of each character in
    /// reverse order (`<0xB7> <0x98> <0x9F> <0xF0>` for U+1F637), while SentencePiece emits
    /// them in UTF-8 order. Every run of byte pieces that is not valid UTF-8 as emitted is
    /// put back in order, character by character (a reversed character ends with its lead
    /// byte); runs already in order are left alone.
    fn fix_byte_order(&self, mut ids: Vec<u32>) -> Vec<u32> {
        let mut i = 0;
        while i < ids.len() {
            if self.piece_byte(ids[i]).is_none() {
                i += 1;
                continue;
            }
            let start = i;
            while i < ids.len() && self.piece_byte(ids[i]).is_some() {
                i += 1;
            }
            let bytes: Vec<u8> = ids[start..i]
                .iter()
                .map(|&id| self.piece_byte(id).expect("byte piece"))
                .collect();
            if std::str::from_utf8(&bytes).is_ok() {
                continue;
            }
            let mut fixed: Vec<u32> = Vec::with_capacity(i - start);
            let mut group: Vec<u32> = Vec::new();
            for (k, &b) in bytes.iter().enumerate() {
                group.push(ids[start + k]);
                if (b & 0xc0) != 0x80 {
                    fixed.extend(group.drain(..).rev());
                }
            }
            fixed.extend(group);
            let fixed_bytes: Vec<u8> = fixed
                .iter()
                .map(|&id| self.piece_byte(id).expect("byte piece"))
                .collect();
            if std::str::from_utf8(&fixed_bytes).is_ok() {
                ids[start..i].copy_from_slice(&fixed);
            }
        }
        ids
    }

    /// `encode(text, add_special_tokens=False)`.
    pub fn encode_no_special(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.sp_encode(text)?;
        Ok(if self.version == ChatGlmVersion::V1 {
            ids.into_iter().map(|i| i + self.num_image_tokens).collect()
        } else {
            ids
        })
    }

    /// `encode(text, add_special_tokens)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let ids = self.encode_no_special(text)?;
        Ok(if add_special_tokens {
            self.build_inputs_with_special_tokens(ids, None)
        } else {
            ids
        })
    }

    /// `encode(text, text_pair)`: `build_inputs_with_special_tokens(A, B)`.
    pub fn encode_pair(&self, text: &str, pair: &str) -> Result<Vec<u32>> {
        let a = self.encode_no_special(text)?;
        let b = self.encode_no_special(pair)?;
        Ok(self.build_inputs_with_special_tokens(a, Some(b)))
    }

    /// v1: `A [gMASK] <sop>` (+ `B <eop>`); v2/v3: `[gMASK] sop A` (+ `B </s>`).
    pub fn build_inputs_with_special_tokens(&self, a: Vec<u32>, b: Option<Vec<u32>>) -> Vec<u32> {
        match &self.v1 {
            Some(v1) => {
                let mut out = a;
                out.push(v1.gmask);
                out.push(v1.bos);
                if let Some(b) = b {
                    out.extend(b);
                    out.push(v1.eos);
                }
                out
            }
            None => {
                let mut out = self.prefix_tokens();
                out.extend(a);
                if let Some(b) = b {
                    out.extend(b);
                    out.push(self.sp_eos);
                }
                out
            }
        }
    }

    /// v2/v3 `get_prefix_tokens`: `[gMASK] sop`; v1: empty (its specials go at the end).
    pub fn prefix_tokens(&self) -> Vec<u32> {
        match (self.command_id("[gMASK]"), self.command_id("sop")) {
            (Some(g), Some(s)) => vec![g, s],
            _ => vec![],
        }
    }

    /// ChatGLM3 `build_chat_input(query, history, role)`: `[gMASK] sop`, then per message
    /// `<|role|>` + `encode(metadata + "\n")` + `encode(content)`, then
    /// `<|role|>\n` + query, then `<|assistant|>`. Returns `(input_ids, position_ids)`.
    pub fn build_chat_input(
        &self,
        query: &str,
        history: &[ChatMessage],
        role: &str,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        if self.version != ChatGlmVersion::V3 {
            return Err(TokenizerError::Run(format!(
                "build_chat_input is ChatGLM3's; this is {}",
                self.version.name()
            )));
        }
        let mut ids = self.prefix_tokens();
        let mut message = |role: &str, metadata: &str, content: &str| -> Result<()> {
            let tok = format!("<|{role}|>");
            let id = self.command_id(&tok).ok_or_else(|| {
                TokenizerError::Run(format!("ChatGLM3: unknown role {role:?} (no {tok} token)"))
            })?;
            ids.push(id);
            ids.extend(self.sp_encode(&format!("{metadata}\n"))?);
            ids.extend(self.sp_encode(content)?);
            Ok(())
        };
        for m in history {
            message(&m.role, &m.metadata, &m.content)?;
        }
        message(role, "", query)?;
        ids.push(
            self.command_id("<|assistant|>")
                .expect("v3 has <|assistant|>"),
        );
        let positions = (0..ids.len() as u32).collect();
        Ok((ids, positions))
    }

    /// `convert_ids_to_tokens` of the reference (v2: command tokens and `<s> </s> <unk>` → "").
    fn id_to_decode_token(&self, id: u32) -> Result<String> {
        let out_of_range = || {
            TokenizerError::Run(format!(
                "{}: token id {id} is out of range (vocab size {})",
                self.version.name(),
                self.vocab_size()
            ))
        };
        match self.version {
            ChatGlmVersion::V1 => self.id_to_token(id).ok_or_else(out_of_range),
            _ => {
                let n = self.pieces.len() as u32;
                if id >= n {
                    let name = self
                        .commands
                        .get((id - n) as usize)
                        .ok_or_else(out_of_range)?;
                    Ok(if self.version == ChatGlmVersion::V3 {
                        name.to_string()
                    } else {
                        String::new()
                    })
                } else if id == self.sp_eos || id == self.sp_bos || id == self.unk_piece_id {
                    Ok(String::new())
                } else {
                    Ok(self.pieces[id as usize].clone())
                }
            }
        }
    }

    /// `decode(ids, skip_special_tokens)` of the reference.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        let v1 = self.v1.as_ref();
        for &id in ids {
            if let Some(v1) = v1 {
                if id == v1.pad {
                    continue;
                }
            }
            if skip_special_tokens && self.all_special_ids().contains(&id) {
                continue;
            }
            tokens.push(self.id_to_decode_token(id)?);
        }
        let mut text = self.decode_pieces(&tokens);
        if v1.is_some() {
            text = v1_postprocess(&text);
        }
        if self.clean_up_tokenization_spaces {
            text = clean_up_tokenization(&text);
        }
        Ok(text)
    }

    /// SentencePiece's `DecodePieces` (sentencepiece_processor.cc `Decode`).
    fn decode_pieces(&self, pieces: &[String]) -> String {
        let mut text = String::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        let mut bytes: Vec<u8> = Vec::new();
        let flush = |bytes: &mut Vec<u8>, text: &mut String| {
            let mut off = 0;
            while off < bytes.len() {
                match utf8_char_len(&bytes[off..]) {
                    Some(n) => {
                        text.push_str(std::str::from_utf8(&bytes[off..off + n]).expect("checked"));
                        off += n;
                    }
                    None => {
                        text.push('\u{FFFD}');
                        off += 1;
                    }
                }
            }
            bytes.clear();
        };
        for piece in pieces {
            let id = self.piece_to_id_or_unk(piece);
            let kind = self.kinds[id as usize];
            if kind == PieceKind::Byte {
                let hex = piece
                    .strip_prefix("<0x")
                    .and_then(|r| r.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    bytes.push(b);
                    continue;
                }
            }
            flush(&mut bytes, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            let (decoded, seen) = match kind {
                PieceKind::Control => (String::new(), false),
                PieceKind::Unknown => {
                    if self.pieces[id as usize] == *piece {
                        (self.unk_surface.clone(), false)
                    } else {
                        (piece.clone(), false)
                    }
                }
                _ => {
                    let mut p = piece.as_str();
                    let mut has_bos_ws = false;
                    if is_bos_ws && self.strip_bos_ws {
                        if let Some(rest) = p.strip_prefix('\u{2581}') {
                            p = rest;
                            has_bos_ws = true;
                        }
                        if self.remove_extra_whitespaces {
                            has_bos_ws = false;
                        }
                    }
                    (p.replace('\u{2581}', " "), has_bos_ws)
                }
            };
            bos_ws_seen = seen;
            text.push_str(&decoded);
        }
        flush(&mut bytes, &mut text);
        text
    }

    /// The model's `process_response` (see [`process_response`]).
    pub fn process_response(&self, response: &str) -> String {
        process_response(self.version, response)
    }
}
