//! Loading texts to measure or calibrate on.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The largest text read (a guard against `/dev/zero` or a wrong path, not a limit of the tools:
/// the calibration and evaluation texts are a few MB).
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// The UTF-8 text of a file, refusing folders and files over [`MAX_TEXT_BYTES`].
pub fn read_utf8(path: &Path) -> Result<String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("reading text {}", path.display()))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        bail!("{} is a folder, not a text file", path.display());
    }
    let mut raw = Vec::new();
    file.take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading text {}", path.display()))?;
    if raw.len() as u64 > MAX_TEXT_BYTES {
        bail!(
            "{} holds more than {} MiB: not a text this tool reads",
            path.display(),
            MAX_TEXT_BYTES >> 20
        );
    }
    String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A text for perplexity, calibration or training: UTF-8, not empty; calibration files in
/// `<doc …>` blocks are stripped of the markup.
pub fn read_text(path: &Path) -> Result<String> {
    let text = read_utf8(path)?;
    let text = strip_doc_markup(&text);
    if text.trim().is_empty() {
        bail!("text {} is empty", path.display());
    }
    Ok(text)
}

/// The tokens of the text at `path` ([`read_text`]) as `model` reads them, from a BOS where it
/// adds one.
pub fn read_tokens(model: &llm::Model, path: &Path) -> Result<Vec<u32>> {
    Ok(model.tokenizer.encode(&read_text(path)?, true)?)
}

/// Removes `<doc …>` / `</doc>` lines (exllamav2's calibration format), keeping the documents.
pub fn strip_doc_markup(text: &str) -> String {
    if !text.trim_start().starts_with("<doc") {
        return text.to_string();
    }
    text.lines()
        .filter(|l| !(l.starts_with("<doc ") || l.starts_with("<doc>") || l.trim() == "</doc>"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_doc_blocks_only() {
        let t = "<doc id=\"1\" title=\"A\">\nA\n\nBody a.\n</doc>\n<doc id=\"2\">\nB\n</doc>";
        assert_eq!(strip_doc_markup(t), "A\n\nBody a.\nB");
        assert_eq!(strip_doc_markup("plain <doc> text"), "plain <doc> text");
    }
}
