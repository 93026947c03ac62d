//! Stop strings over streamed text: text that may be the start of a stop string is held back
//! until the next piece shows whether it is.

#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Takes the next piece of output; returns the text safe to release and whether a stop string
    /// ended the output (the text is then everything before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.pending.truncate(at);
            return (std::mem::take(&mut self.pending), true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| self.partial_stop_len(s))
            .max()
            .unwrap_or(0);
        let release = self.pending.len() - hold;
        (self.pending.drain(..release).collect(), false)
    }

    /// The text held back (the output ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// The longest proper prefix of `stop` that the pending text ends with, in bytes.
    fn partial_stop_len(&self, stop: &str) -> usize {
        stop.char_indices()
            .map(|(i, _)| i)
            .skip(1)
            .filter(|&i| self.pending.ends_with(&stop[..i]))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns the released text and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = s.push(p);
            out += &text;
            if stopped {
                return (out, true);
            }
        }
        out += &s.flush();
        (out, false)
    }

    #[test]
    fn a_stop_string_split_over_pieces_ends_the_text_before_it() {
        assert_eq!(
            run(&["\n\n"], &["Hello", " world\n", "\nMore"]),
            ("Hello world".into(), true)
        );
        assert_eq!(
            run(&["END", "x"], &["abE", "N", "D tail"]),
            ("ab".into(), true)
        );
    }

    #[test]
    fn held_back_text_that_is_no_stop_is_released() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("abEN"), ("ab".into(), false));
        assert_eq!(s.push("d"), ("ENd".into(), false));
        assert_eq!(run(&["END"], &["abEN"]), ("abEN".into(), false));
    }

    #[test]
    fn no_stops_release_everything_and_multibyte_prefixes_are_whole_characters() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        let mut s = StopStrings::new(vec!["éé".into()]);
        assert_eq!(s.push("xé"), ("x".into(), false));
        assert_eq!(s.push("é"), ("".into(), true));
    }
}
