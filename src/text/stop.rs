//! Stop strings over streamed text.
//!
//! Generated text arrives a token at a time, and a stop string can straddle any number of tokens
//! ("<|", "end", "|>"). [`StopStrings`] therefore holds back the shortest tail of the stream that
//! could still grow into a stop string, and releases it once it no longer can. What it releases
//! never contains a stop string or anything after one, matching OpenAI's `stop` semantics.

/// What one [`StopStrings::push`] released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to show now.
    pub text: String,
    /// A stop string was hit: `text` ends right before it and the stream is over.
    pub stopped: bool,
}

/// Incremental stop-string matcher for one generated sequence.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Tail of the stream that is a prefix of some stop string, not yet released.
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Empty stop strings are ignored: they would match before any text.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Whether a stop string has been hit; later pushes release nothing.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds newly decoded text; returns what can be shown now.
    pub fn push(&mut self, new_text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutcome {
                text: new_text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(new_text);

        // The earliest occurrence wins: the text must end before the first stop string, whichever
        // of them it is. The held part alone contains none, so searching all of it is cheap and
        // finds matches that began in earlier pushes.
        let first_hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first_hit {
            let mut text = std::mem::take(&mut self.held);
            text.truncate(pos);
            self.stopped = true;
            return StopOutcome {
                text,
                stopped: true,
            };
        }

        let keep = self.longest_partial_suffix();
        let split = self.held.len() - keep;
        let rest = self.held.split_off(split);
        let text = std::mem::replace(&mut self.held, rest);
        StopOutcome {
            text,
            stopped: false,
        }
    }

    /// Ends the stream: releases the held-back text (it never completed a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let held = self.held.as_str();
        let mut best = 0;
        for stop in &self.stops {
            // A proper prefix: the full string would have been found by `find` already.
            let max = (stop.len() - 1).min(held.len());
            for len in (best + 1..=max).rev() {
                let start = held.len() - len;
                // A stop string prefix starts on a character boundary, so a suffix that does
                // not cannot match; checking first keeps the slicing below from panicking.
                if held.is_char_boundary(start)
                    && stop.as_bytes().starts_with(&held.as_bytes()[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopStrings {
        StopStrings::new(s.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut s = stops(&[]);
        assert_eq!(
            s.push("hello"),
            StopOutcome {
                text: "hello".into(),
                stopped: false
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn stop_inside_one_push() {
        let mut s = stops(&["END"]);
        assert_eq!(
            s.push("abc END def"),
            StopOutcome {
                text: "abc ".into(),
                stopped: true
            }
        );
        // Nothing comes after a stop.
        assert_eq!(
            s.push("more"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn stop_split_over_three_pushes() {
        let mut s = stops(&["<|end|>"]);
        assert_eq!(
            s.push("Paris<|"),
            StopOutcome {
                text: "Paris".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("en"),
            StopOutcome {
                text: String::new(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("d|> tail"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn partial_match_that_is_not_a_stop_is_released() {
        let mut s = stops(&["\n\nUser:"]);
        assert_eq!(
            s.push("one\n"),
            StopOutcome {
                text: "one".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("\nUs"),
            StopOutcome {
                text: String::new(),
                stopped: false
            }
        );
        // "\n\nUse" continues the prefix, "\n\nUsed" breaks it: everything is released.
        assert_eq!(
            s.push("ed"),
            StopOutcome {
                text: "\n\nUsed".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push(" it"),
            StopOutcome {
                text: " it".into(),
                stopped: false
            }
        );
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn broken_prefix_keeps_a_shorter_restart() {
        // "aab" is not a prefix of "abc", but its tail "ab" is: only "a" may go out.
        let mut s = stops(&["abc"]);
        assert_eq!(
            s.push("aa"),
            StopOutcome {
                text: "a".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("b"),
            StopOutcome {
                text: String::new(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("c!"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut s = stops(&["world", "lo w"]);
        assert_eq!(
            s.push("hello world"),
            StopOutcome {
                text: "hel".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn finish_releases_held_text() {
        let mut s = stops(&["STOP"]);
        assert_eq!(
            s.push("go ST"),
            StopOutcome {
                text: "go ".into(),
                stopped: false
            }
        );
        assert_eq!(s.finish(), "ST");
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let mut s = stops(&["é!"]);
        assert_eq!(
            s.push("café"),
            StopOutcome {
                text: "caf".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("s"),
            StopOutcome {
                text: "és".into(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("é"),
            StopOutcome {
                text: String::new(),
                stopped: false
            }
        );
        assert_eq!(
            s.push("!"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut s = stops(&[""]);
        assert!(s.is_empty());
        assert_eq!(
            s.push("x"),
            StopOutcome {
                text: "x".into(),
                stopped: false
            }
        );
    }
}
