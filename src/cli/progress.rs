//! The progress display of long commands: a bar on a terminal, a log line per step otherwise.

use crate::train::trainer::{Observer, StepMetrics};
use indicatif::{ProgressBar, ProgressStyle};

pub struct StepProgress {
    bar: ProgressBar,
    /// What the loss is called on screen ("loss", "KL").
    loss_name: &'static str,
}

impl StepProgress {
    pub fn new(loss_name: &'static str) -> Self {
        let bar = ProgressBar::new(1);
        let style =
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Self { bar, loss_name }
    }

    /// Prints a line above the bar (or to stdout when there is no terminal).
    pub fn println(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

impl Observer for StepProgress {
    fn on_step(&mut self, m: &StepMetrics) {
        let message = format!(
            "{} {:.4}  lr {:.2e}  {:.0} tok/s  mem {:.0} MB",
            self.loss_name,
            m.loss,
            m.lr,
            m.tokens_per_s,
            m.peak_memory_bytes as f64 / 1e6
        );
        if self.bar.is_hidden() {
            tracing::info!(step = m.step, total = m.total_steps, "{message}");
        }
        self.bar.set_length(m.total_steps as u64);
        self.bar.set_position(m.step as u64);
        self.bar.set_message(message);
    }

    fn on_validation(&mut self, epoch: usize, _step: usize, loss: f64) {
        self.println(format!(
            "epoch {}: validation {} {loss:.4}",
            epoch + 1,
            self.loss_name
        ));
    }
}
