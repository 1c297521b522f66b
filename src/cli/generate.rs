//! `rewind generate` and `rewind chat`.

use crate::cli::ModelArgs;
use crate::model::generate::{run_to_completion, GenerationParams, Sequence};
use crate::model::loader::LoadedModel;
use crate::model::sampling::SamplingParams;
use crate::text::chat_template::ChatMessage;
use anyhow::Result;
use std::io::{BufRead, Write};

#[derive(clap::Args, Debug)]
pub struct SamplingArgs {
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> GenerationParams {
        GenerationParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// Optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Streams the assistant's reply to `messages` to stdout and returns it.
fn reply(
    loaded: &LoadedModel,
    messages: &[ChatMessage],
    params: GenerationParams,
) -> Result<String> {
    let prompt = loaded.chat_template.render(messages, true, None)?;
    let ids = loaded.tokenizer.encode(&prompt, true)?;
    let mut seqs = [Sequence::new(&loaded.model, ids, params)];
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    run_to_completion(&loaded.model, &loaded.tokenizer, &mut seqs, |_, step| {
        text.push_str(&step.text);
        let _ = write!(stdout, "{}", step.text);
        let _ = stdout.flush();
    })?;
    println!();
    Ok(text)
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load_for_inference()?;
    reply(
        &loaded,
        &[ChatMessage::new("user", &args.prompt)],
        args.sampling.params(),
    )?;
    Ok(())
}

pub fn run_chat(args: ChatArgs) -> Result<()> {
    let loaded = args.model.load_for_inference()?;
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        loaded.source.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(ChatMessage::new("user", line.trim_end()));
        let answer = reply(&loaded, &messages, args.sampling.params())?;
        messages.push(ChatMessage::new("assistant", &answer));
    }
}
