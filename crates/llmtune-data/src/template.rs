//! The one prompt-template registry, used by training, predict, chat, the API server and
//! export alike, so a model is always prompted the way it was trained.
//!
//! A [`Template`] says how to render (system, history, query) into the *source* token ids,
//! which special tokens go between source and target, which token ends a target (its
//! "eos") and which tokens stop generation. Special tokens are resolved through the
//! tokenizer ([`Template::resolve`]); a missing one is an error naming the template and
//! the token.
//!
//! The registered templates (source format; specials between source and target; the
//! token ending a target; the stop tokens):
//!
//! * `chatglm`: `[Round 1]\n\n问：{q1}\n\n答：{a1}\n\n[Round 2]\n\n问：{q}\n\n答：`;
//!   `[gMASK] <sop>`; `<eop>`; `<eop>`.
//! * `chatglm2`: `[gMASK] sop` + the same rounds; none; `</s>`; `</s>`.
//! * `chatglm3`: `[gMASK] sop`, optional `<|system|>` + `\n{s}`, then per turn `<|user|>` +
//!   `\n{q}` + `<|assistant|>` + `\n{a}`, ending with `<|user|>` `\n{q}` `<|assistant|>`;
//!   none; `</s>` (the target starts with `\n`); `</s>`, `<|user|>`, `<|observation|>`.
//!   As in ChatGLM3's `build_chat_input`, each `\n` and each message are encoded apart
//!   ([`Piece::Split`]).
//! * `chatml`: `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n` (no default
//!   system); none; `<|im_end|>`; `<|im_end|>` (+ `<|endoftext|>` when present).
//! * `llama2`: `<s>[INST] <<SYS>>\n{s}\n<</SYS>>\n\n{q} [/INST]`; none; eos; eos.
//! * `llama3`: `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>`
//!   `<|start_header_id|>assistant<|end_header_id|>\n\n`; none; `<|eot_id|>`; `<|eot_id|>`
//!   (+ `<|eom_id|>`, `<|end_of_text|>` when present).
//! * `alpaca`: `{system}### Instruction:\n{q}\n\n### Response:\n`; none; eos; eos.
//! * `vanilla`: `{q}` (history ignored); none; eos; eos.
//!
//! The ChatGLM formats follow the reference (ChatGLM-Efficient-Tuning) and ChatGLM2's
//! `build_prompt` (rounds counted from 1); the others follow LLaMA-Factory's `template.py`.
//!
//! Text is encoded the way the reference does it: consecutive text pieces are joined and
//! encoded in one call, so the whole ChatGLM prompt is a single `encode` (as
//! `tokenizer.encode(prompt)` in the reference); special-token pieces are inserted as ids
//! (which is what Hugging Face tokenizers do with added tokens inside text anyway).
//!
//! ## Truncation (differs from the reference)
//! [`ResolvedTemplate::encode_prompt`] keeps the prompt within `max_source_length` tokens
//! (template specials included) by dropping the **oldest** history rounds first; the
//! current question is never dropped. Rounds are renumbered from 1 after dropping, so the
//! prompt reads as a shorter conversation. If the current round alone is over budget, its
//! query loses tokens from the **front**, so the template's suffix (`答：`, the assistant
//! header) always ends the source. The reference keeps the head of an over-long source
//! instead, which cuts off the current question.

use llmtune_tokenize::Tokenizer;

use crate::error::{DataError, Result};

/// One element of a template format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Literal text.
    Text(&'static str),
    /// The message content (query, answer or system text).
    Content,
    /// The 1-based round number (ChatGLM's `[Round i]`).
    Idx,
    /// A special token, looked up with `token_to_id`.
    Token(&'static str),
    /// The tokenizer's bos id (skipped when it has none). Rendered as `<s>` in text.
    Bos,
    /// The tokenizer's eos id (required). Rendered as `</s>` in text.
    Eos,
    /// Ends a text run: the text before and after it is encoded in separate calls (ChatGLM3
    /// encodes `"\n"` and the message apart, like its `build_chat_input`). Renders as nothing.
    Split,
}

use Piece::{Content, Idx, Split, Text, Token};

/// A prompt format. See the module docs for the registered ones.
#[derive(Debug, PartialEq, Eq)]
pub struct Template {
    /// The registry name (`--template`).
    pub name: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// Starts every source (e.g. `[gMASK] sop`, bos).
    pub prefix: &'static [Piece],
    /// Formats the system text (`Content`); placed after the prefix.
    pub system: &'static [Piece],
    /// The system text used when none is given.
    pub default_system: Option<&'static str>,
    /// Llama-2 style: the formatted system text goes inside the first user message.
    pub system_in_first_user: bool,
    /// Formats a user message (`Content`, `Idx`); ends with the assistant header.
    pub user: &'static [Piece],
    /// Formats an earlier answer in the history.
    pub assistant: &'static [Piece],
    /// Pieces that start every target (ChatGLM3's `\n`); encoded separately.
    pub target_prefix: &'static [Piece],
    /// Special tokens between source and target (ChatGLM-6B's `[gMASK] <sop>`).
    pub separator: &'static [Piece],
    /// The token appended after a target (and the first stop token).
    pub eos: Piece,
    /// Further tokens that stop generation (required in the vocabulary).
    pub stop: &'static [Piece],
    /// Tokens that stop generation when the vocabulary has them.
    pub optional_stop: &'static [&'static str],
    /// Whether history is rendered (`vanilla` ignores it).
    pub use_history: bool,
    /// ChatGLM-6B (v1): examples carry the index of `<sop>` for the 2-D positions.
    pub glm_v1: bool,
}

const GLM_USER: &[Piece] = &[
    Text("[Round "),
    Idx,
    Text("]\n\n问："),
    Content,
    Text("\n\n答："),
];
const GLM_ASSISTANT: &[Piece] = &[Content, Text("\n\n")];

/// ChatGLM-6B (v1), the reference's only format.
pub const CHATGLM: Template = Template {
    name: "chatglm",
    description: "ChatGLM-6B: [Round i] 问/答 rounds, source [gMASK] <sop> target <eop>",
    prefix: &[],
    system: &[Content],
    default_system: None,
    system_in_first_user: false,
    user: GLM_USER,
    assistant: GLM_ASSISTANT,
    target_prefix: &[],
    separator: &[Token("[gMASK]"), Token("<sop>")],
    eos: Token("<eop>"),
    stop: &[],
    optional_stop: &[],
    use_history: true,
    glm_v1: true,
};

/// ChatGLM2-6B.
pub const CHATGLM2: Template = Template {
    name: "chatglm2",
    description: "ChatGLM2-6B: [gMASK] sop, then [Round i] 问/答 rounds; target ends with </s>",
    prefix: &[Token("[gMASK]"), Token("sop")],
    system: &[Content],
    default_system: None,
    system_in_first_user: false,
    user: GLM_USER,
    assistant: GLM_ASSISTANT,
    target_prefix: &[],
    separator: &[],
    eos: Token("</s>"),
    stop: &[],
    optional_stop: &[],
    use_history: true,
    glm_v1: false,
};

/// ChatGLM3-6B's role-token format.
pub const CHATGLM3: Template = Template {
    name: "chatglm3",
    description: "ChatGLM3-6B: [gMASK] sop, <|system|>/<|user|>/<|assistant|> role tokens",
    prefix: &[Token("[gMASK]"), Token("sop")],
    system: &[Token("<|system|>"), Text("\n"), Split, Content],
    default_system: None,
    system_in_first_user: false,
    user: &[
        Token("<|user|>"),
        Text("\n"),
        Split,
        Content,
        Token("<|assistant|>"),
    ],
    assistant: &[Text("\n"), Split, Content],
    target_prefix: &[Text("\n")],
    separator: &[],
    eos: Token("</s>"),
    stop: &[Token("<|user|>"), Token("<|observation|>")],
    optional_stop: &[],
    use_history: true,
    glm_v1: false,
};

/// ChatML (Qwen2, SmolLM2), without a default system message.
pub const CHATML: Template = Template {
    name: "chatml",
    description: "ChatML (Qwen2, SmolLM2): <|im_start|>role\\n...<|im_end|>, no default system",
    prefix: &[],
    system: &[
        Token("<|im_start|>"),
        Text("system\n"),
        Content,
        Token("<|im_end|>"),
        Text("\n"),
    ],
    default_system: None,
    system_in_first_user: false,
    user: &[
        Token("<|im_start|>"),
        Text("user\n"),
        Content,
        Token("<|im_end|>"),
        Text("\n"),
        Token("<|im_start|>"),
        Text("assistant\n"),
    ],
    assistant: &[Content, Token("<|im_end|>"), Text("\n")],
    target_prefix: &[],
    separator: &[],
    eos: Token("<|im_end|>"),
    stop: &[],
    optional_stop: &["<|endoftext|>"],
    use_history: true,
    glm_v1: false,
};

/// Llama-2 chat.
pub const LLAMA2: Template = Template {
    name: "llama2",
    description: "Llama-2 chat: <s>[INST] <<SYS>>...<</SYS>> q [/INST] a </s>",
    prefix: &[],
    system: &[Text("<<SYS>>\n"), Content, Text("\n<</SYS>>\n\n")],
    default_system: None,
    system_in_first_user: true,
    user: &[Token("<s>"), Text("[INST] "), Content, Text(" [/INST]")],
    assistant: &[Content, Piece::Eos],
    target_prefix: &[],
    separator: &[],
    eos: Piece::Eos,
    stop: &[],
    optional_stop: &[],
    use_history: true,
    glm_v1: false,
};

/// Llama-3 instruct.
pub const LLAMA3: Template = Template {
    name: "llama3",
    description: "Llama-3 instruct: header tokens, <|eot_id|> ends each turn",
    prefix: &[Token("<|begin_of_text|>")],
    system: &[
        Token("<|start_header_id|>"),
        Text("system"),
        Token("<|end_header_id|>"),
        Text("\n\n"),
        Content,
        Token("<|eot_id|>"),
    ],
    default_system: None,
    system_in_first_user: false,
    user: &[
        Token("<|start_header_id|>"),
        Text("user"),
        Token("<|end_header_id|>"),
        Text("\n\n"),
        Content,
        Token("<|eot_id|>"),
        Token("<|start_header_id|>"),
        Text("assistant"),
        Token("<|end_header_id|>"),
        Text("\n\n"),
    ],
    assistant: &[Content, Token("<|eot_id|>")],
    target_prefix: &[],
    separator: &[],
    eos: Token("<|eot_id|>"),
    stop: &[],
    optional_stop: &["<|eom_id|>", "<|end_of_text|>"],
    use_history: true,
    glm_v1: false,
};

/// Stanford Alpaca.
pub const ALPACA: Template = Template {
    name: "alpaca",
    description: "Alpaca: ### Instruction / ### Response with the Alpaca system line",
    prefix: &[],
    system: &[Content],
    default_system: Some(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
    ),
    system_in_first_user: false,
    user: &[
        Text("### Instruction:\n"),
        Content,
        Text("\n\n### Response:\n"),
    ],
    assistant: &[Content, Piece::Eos, Text("\n\n")],
    target_prefix: &[],
    separator: &[],
    eos: Piece::Eos,
    stop: &[],
    optional_stop: &[],
    use_history: true,
    glm_v1: false,
};

/// No template: the query as is, history ignored.
pub const VANILLA: Template = Template {
    name: "vanilla",
    description: "no template: the query text as is (history ignored), target + eos",
    prefix: &[],
    system: &[Content],
    default_system: None,
    system_in_first_user: false,
    user: &[Content],
    assistant: &[Content, Piece::Eos],
    target_prefix: &[],
    separator: &[],
    eos: Piece::Eos,
    stop: &[],
    optional_stop: &[],
    use_history: false,
    glm_v1: false,
};

static TEMPLATES: [&Template; 8] = [
    &CHATGLM, &CHATGLM2, &CHATGLM3, &CHATML, &LLAMA2, &LLAMA3, &ALPACA, &VANILLA,
];

impl Template {
    /// Every registered template.
    pub fn all() -> &'static [&'static Template] {
        &TEMPLATES
    }

    /// The registered names.
    pub fn names() -> Vec<&'static str> {
        TEMPLATES.iter().map(|t| t.name).collect()
    }

    /// Looks a template up by name; the error lists the known names.
    pub fn by_name(name: &str) -> Result<&'static Template> {
        TEMPLATES
            .iter()
            .copied()
            .find(|t| t.name == name)
            .ok_or_else(|| DataError::UnknownTemplate {
                name: name.to_string(),
                known: Self::names().join(", "),
            })
    }

    /// The natural template of a model: `model_type` from `config.json` plus a look at the
    /// vocabulary. ChatGLM checkpoints all say `chatglm`: role tokens mean ChatGLM3, `<sop>`
    /// means ChatGLM-6B, `sop` ChatGLM2. Otherwise `<|im_start|>`/`<|im_end|>` mean ChatML
    /// (Qwen2, SmolLM2), `<|start_header_id|>`/`<|eot_id|>` Llama 3, and a Llama/Mistral
    /// model with `<s>` Llama 2; anything else gets `vanilla`.
    pub fn default_for_model_type(model_type: &str, tokenizer: &Tokenizer) -> &'static Template {
        let has = |t: &str| tokenizer.token_to_id(t).is_some();
        let mt = model_type.to_ascii_lowercase();
        if mt.starts_with("chatglm") {
            if has("<|user|>") && has("<|assistant|>") {
                return &CHATGLM3;
            }
            if has("<sop>") {
                return &CHATGLM;
            }
            if has("sop") {
                return &CHATGLM2;
            }
            return &CHATGLM;
        }
        if has("<|im_start|>") && has("<|im_end|>") {
            return &CHATML;
        }
        if has("<|start_header_id|>") && has("<|eot_id|>") {
            return &LLAMA3;
        }
        if matches!(mt.as_str(), "llama" | "mistral") && has("<s>") {
            return &LLAMA2;
        }
        &VANILLA
    }

    /// The system text used for a given `source_prefix` (or the template default).
    pub fn system_text<'s>(&self, system: Option<&'s str>) -> Option<&'s str> {
        match system {
            Some(s) if !s.is_empty() => Some(s),
            _ => self.default_system,
        }
    }

    /// Renders the source as text, for display and tests: special tokens are written as
    /// their strings, [`Piece::Bos`] as `<s>` and [`Piece::Eos`] as `</s>`. The separator is
    /// not included. This is the text the tokenizer sees (joined across special tokens).
    pub fn render_text(
        &'static self,
        system: Option<&str>,
        history: &[(String, String)],
        query: &str,
    ) -> String {
        let history = if self.use_history { history } else { &[] };
        let (before, after) = render_parts(self, system, history);
        let mut s = String::new();
        for seg in before
            .iter()
            .chain([Seg::Content].iter())
            .chain(after.iter())
        {
            match seg {
                Seg::Text(t) => s.push_str(t),
                Seg::Content => s.push_str(query),
                Seg::Piece(p) => s.push_str(piece_text(*p)),
            }
        }
        s
    }

    /// Resolves every special token through the tokenizer. Errors name the template and the
    /// missing token.
    pub fn resolve<'a>(&'static self, tokenizer: &'a Tokenizer) -> Result<ResolvedTemplate<'a>> {
        let missing = |token: &str, hint: &str| DataError::MissingSpecialToken {
            template: self.name.to_string(),
            token: token.to_string(),
            tokenizer: tokenizer.source().to_path_buf(),
            hint: hint.to_string(),
        };
        let mut ids: Vec<(&'static str, u32)> = Vec::new();
        let mut need_eos = false;
        let groups: [&[Piece]; 8] = [
            self.prefix,
            self.system,
            self.user,
            self.assistant,
            self.target_prefix,
            self.separator,
            std::slice::from_ref(&self.eos),
            self.stop,
        ];
        for p in groups.iter().flat_map(|g| g.iter()) {
            match p {
                Token(t) if !ids.iter().any(|(n, _)| n == t) => {
                    let id = tokenizer.token_to_id(t).ok_or_else(|| {
                        missing(
                            t,
                            &format!(
                                "; pick a template that fits the model (known: {})",
                                Template::names().join(", ")
                            ),
                        )
                    })?;
                    ids.push((t, id));
                }
                Piece::Eos => need_eos = true,
                _ => {}
            }
        }
        let eos = match tokenizer.eos_id() {
            Some(e) => Some(e),
            None if need_eos => {
                return Err(missing(
                    "eos",
                    " (it defines no eos_token; add one to tokenizer_config.json)",
                ))
            }
            None => None,
        };
        let mut r = ResolvedTemplate {
            template: self,
            tokenizer,
            ids,
            bos: tokenizer.bos_id(),
            eos,
            separator_ids: Vec::new(),
            target_eos: 0,
            stop_ids: Vec::new(),
            target_prefix_ids: Vec::new(),
        };
        r.separator_ids = self
            .separator
            .iter()
            .filter_map(|p| r.piece_id(*p))
            .collect();
        r.target_eos = r.piece_id(self.eos).ok_or_else(|| missing("eos", ""))?;
        let mut stops = vec![r.target_eos];
        for p in self.stop {
            if let Some(id) = r.piece_id(*p) {
                stops.push(id);
            }
        }
        for t in self.optional_stop {
            if let Some(id) = tokenizer.token_to_id(t) {
                stops.push(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        stops.retain(|id| seen.insert(*id));
        r.stop_ids = stops;
        let mut tp = SegBuf::default();
        tp.pieces(self.target_prefix, "", 0);
        r.target_prefix_ids = r.encode_segs(&tp.segs)?;
        Ok(r)
    }
}

fn piece_text(p: Piece) -> &'static str {
    match p {
        Text(t) | Token(t) => t,
        Piece::Bos => "<s>",
        Piece::Eos => "</s>",
        Content | Idx | Split => "",
    }
}

/// A rendered element: merged text, the query placeholder, or a special piece.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Text(String),
    Content,
    Piece(Piece),
}

#[derive(Debug, Default)]
struct SegBuf {
    segs: Vec<Seg>,
}

impl SegBuf {
    fn text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if let Some(Seg::Text(t)) = self.segs.last_mut() {
            t.push_str(s);
        } else {
            self.segs.push(Seg::Text(s.to_string()));
        }
    }

    fn pieces(&mut self, pieces: &[Piece], content: &str, idx: usize) {
        for p in pieces {
            match p {
                Text(t) => self.text(t),
                Content => self.text(content),
                Idx => self.text(&idx.to_string()),
                other => self.segs.push(Seg::Piece(*other)),
            }
        }
    }
}

/// Renders everything around the current query: `before` ends just before the query text,
/// `after` holds the rest of the user format (the assistant header).
fn render_parts(
    t: &'static Template,
    system: Option<&str>,
    history: &[(String, String)],
) -> (Vec<Seg>, Vec<Seg>) {
    let mut b = SegBuf::default();
    b.pieces(t.prefix, "", 0);
    let mut first_user_prefix = String::new();
    if let Some(sys) = t.system_text(system) {
        if t.system_in_first_user {
            for p in t.system {
                match p {
                    Content => first_user_prefix.push_str(sys),
                    other => first_user_prefix.push_str(piece_text(*other)),
                }
            }
        } else {
            b.pieces(t.system, sys, 0);
        }
    }
    let cpos = t
        .user
        .iter()
        .position(|p| *p == Content)
        .unwrap_or(t.user.len());
    let (user_before, user_after) = (&t.user[..cpos], &t.user[(cpos + 1).min(t.user.len())..]);
    for (i, (q, a)) in history.iter().enumerate() {
        b.pieces(user_before, "", i + 1);
        if i == 0 {
            b.text(&first_user_prefix);
        }
        b.text(q);
        b.pieces(user_after, "", i + 1);
        b.pieces(t.assistant, a, i + 1);
    }
    let idx = history.len() + 1;
    b.pieces(user_before, "", idx);
    if history.is_empty() {
        b.text(&first_user_prefix);
    }
    let mut a = SegBuf::default();
    a.pieces(user_after, "", idx);
    (b.segs, a.segs)
}

/// The encoding of a generation prompt (source + the template's separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptEncoding {
    /// Source ids followed by the separator specials: what the model is given.
    pub input_ids: Vec<u32>,
    /// ChatGLM-6B: the index of `<sop>` in `input_ids`.
    pub sop_index: Option<usize>,
    /// The prompt length (separator included) before any truncation.
    pub full_len: usize,
    /// History rounds dropped to fit.
    pub rounds_dropped: usize,
    /// Tokens removed from the front of the current query.
    pub query_tokens_cut: usize,
}

impl PromptEncoding {
    /// Whether anything was cut.
    pub fn truncated(&self) -> bool {
        self.rounds_dropped > 0 || self.query_tokens_cut > 0
    }
}

/// A template bound to a tokenizer, with its special ids resolved.
#[derive(Debug, Clone)]
pub struct ResolvedTemplate<'a> {
    /// The template.
    pub template: &'static Template,
    tokenizer: &'a Tokenizer,
    ids: Vec<(&'static str, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
    separator_ids: Vec<u32>,
    target_eos: u32,
    stop_ids: Vec<u32>,
    target_prefix_ids: Vec<u32>,
}

impl<'a> ResolvedTemplate<'a> {
    /// The tokenizer.
    pub fn tokenizer(&self) -> &'a Tokenizer {
        self.tokenizer
    }

    /// Special ids between source and target (`[gMASK] <sop>` for ChatGLM-6B).
    pub fn separator_ids(&self) -> &[u32] {
        &self.separator_ids
    }

    /// The id appended after every target.
    pub fn eos_id(&self) -> u32 {
        self.target_eos
    }

    /// Ids that end generation (the target eos first).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Ids that start every target (ChatGLM3's `\n`; empty elsewhere).
    pub fn target_prefix_ids(&self) -> &[u32] {
        &self.target_prefix_ids
    }

    fn piece_id(&self, p: Piece) -> Option<u32> {
        match p {
            Token(t) => self.ids.iter().find(|(n, _)| *n == t).map(|(_, id)| *id),
            Piece::Bos => self.bos,
            Piece::Eos => self.eos,
            _ => None,
        }
    }

    fn encode_segs(&self, segs: &[Seg]) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for s in segs {
            match s {
                Seg::Text(t) => out.extend(self.tokenizer.encode(t, false)?),
                Seg::Piece(p) => out.extend(self.piece_id(*p)),
                Seg::Content => {}
            }
        }
        Ok(out)
    }

    fn encode_full(
        &self,
        system: Option<&str>,
        history: &[(String, String)],
        query: &str,
    ) -> Result<Vec<u32>> {
        let (before, after) = render_parts(self.template, system, history);
        let mut segs = SegBuf { segs: before };
        segs.text(query);
        for s in after {
            match s {
                Seg::Text(t) => segs.text(&t),
                other => segs.segs.push(other),
            }
        }
        self.encode_segs(&segs.segs)
    }

    /// The largest number k < n of newest history rounds whose prompt fits `budget`, with
    /// its encoding; `None` when not even k = 0 fits. Assumes the length grows with k.
    ///
    /// The first probe is estimated from text lengths (tokens per byte of the full prompt),
    /// its neighbour brackets the answer, and a binary search closes the rest; most prompts
    /// need two encodes instead of log2(n).
    fn fit_rounds(
        &self,
        system: Option<&str>,
        history: &[(String, String)],
        query: &str,
        full_tokens: usize,
        budget: usize,
    ) -> Result<Option<(usize, Vec<u32>)>> {
        let n = history.len();
        const ROUND_OVERHEAD: usize = 16;
        let round_bytes: Vec<usize> = history
            .iter()
            .map(|(q, a)| q.len() + a.len() + ROUND_OVERHEAD)
            .collect();
        let base = query.len() + system.map_or(0, str::len) + ROUND_OVERHEAD;
        let total = base + round_bytes.iter().sum::<usize>();
        let per_byte = full_tokens as f64 / total as f64;
        let mut est = 0;
        let mut bytes = base;
        for k in 1..n {
            bytes += round_bytes[n - k];
            if (bytes as f64 * per_byte) as usize > budget {
                break;
            }
            est = k;
        }

        // lo: the largest k known to fit (with its ids); hi: the smallest k known not to.
        let mut lo: Option<(usize, Vec<u32>)> = None;
        let mut hi = n;
        let probe =
            |k: usize, lo: &mut Option<(usize, Vec<u32>)>, hi: &mut usize| -> Result<bool> {
                let ids = self.encode_full(system, &history[n - k..], query)?;
                if ids.len() <= budget {
                    if lo.as_ref().is_none_or(|(l, _)| k > *l) {
                        *lo = Some((k, ids));
                    }
                    Ok(true)
                } else {
                    *hi = (*hi).min(k);
                    Ok(false)
                }
            };
        if probe(est, &mut lo, &mut hi)? {
            if est + 1 < hi {
                probe(est + 1, &mut lo, &mut hi)?;
            }
        } else if est > 0 {
            probe(est - 1, &mut lo, &mut hi)?;
        }
        loop {
            let l = lo.as_ref().map_or(-1, |(l, _)| *l as isize);
            if hi as isize - l <= 1 {
                return Ok(lo);
            }
            let mid = (l + (hi as isize - l) / 2) as usize;
            probe(mid, &mut lo, &mut hi)?;
        }
    }

    /// Encodes a target: the template's target prefix, then the text (no eos).
    pub fn encode_target(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.target_prefix_ids.clone();
        ids.extend(self.tokenizer.encode(text, false)?);
        Ok(ids)
    }

    /// Encodes (system, history, query) into `source + separator`, at most
    /// `max_source_length` tokens in all, truncating as the module docs say. `None` when
    /// even the template's own tokens around one query token do not fit.
    pub fn encode_prompt(
        &self,
        system: Option<&str>,
        history: &[(String, String)],
        query: &str,
        max_source_length: usize,
    ) -> Result<Option<PromptEncoding>> {
        let history = if self.template.use_history {
            history
        } else {
            &[]
        };
        let sep = self.separator_ids.len();
        let budget = max_source_length.saturating_sub(sep);
        let n = history.len();
        let full = self.encode_full(system, history, query)?;
        let full_len = full.len() + sep;
        let finish = |mut ids: Vec<u32>, rounds_dropped: usize, query_tokens_cut: usize| {
            ids.extend_from_slice(&self.separator_ids);
            let sop_index = self.template.glm_v1.then(|| ids.len() - 1);
            PromptEncoding {
                input_ids: ids,
                sop_index,
                full_len,
                rounds_dropped,
                query_tokens_cut,
            }
        };
        if full.len() <= budget {
            return Ok(Some(finish(full, 0, 0)));
        }
        if n > 0 {
            if let Some((k, ids)) = self.fit_rounds(system, history, query, full.len(), budget)? {
                return Ok(Some(finish(ids, n - k, 0)));
            }
        }
        // The current round alone is over budget: cut the query from the front.
        let (before, after) = render_parts(self.template, system, &[]);
        let b = self.encode_segs(&before)?;
        let a = self.encode_segs(&after)?;
        let q = self.tokenizer.encode(query, false)?;
        let room = budget.saturating_sub(b.len() + a.len());
        if room == 0 || q.is_empty() {
            return Ok(None);
        }
        let keep = room.min(q.len());
        let mut ids = b;
        ids.extend_from_slice(&q[q.len() - keep..]);
        ids.extend(a);
        Ok(Some(finish(ids, n, q.len() - keep)))
    }
}
