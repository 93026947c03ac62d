//! Loading texts to measure or calibrate on.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads a UTF-8 text file; calibration files in `<doc …>` blocks are stripped of the markup.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read(path).with_context(|| format!("reading text {}", path.display()))?;
    let text =
        String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))?;
    let text = strip_doc_markup(&text);
    if text.trim().is_empty() {
        bail!("text {} is empty", path.display());
    }
    Ok(text)
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
