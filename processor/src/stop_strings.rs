//! Stop strings over a stream of text deltas. A stop string may span several tokens, so text
//! that could still turn out to be the start of one is held back until it cannot: a client
//! never sees part of a stop string (vLLM and TGI hold back the same way).

/// Watches a stream of text deltas for any of the request's stop strings.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    include_in_output: bool,
    held: String,
    stopped: bool,
}

/// What a delta releases to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Text safe to send now.
    pub text: String,
    /// The stop string that ended the stream, if one matched.
    pub stop: Option<String>,
}

impl StopStrings {
    /// Empty stop strings are dropped: they would match before any text.
    pub fn new(stops: Vec<String>, include_in_output: bool) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            include_in_output,
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Feeds the next delta. `armed` is false while stop conditions are suppressed
    /// (`min_tokens` not reached): the text then passes through unchecked.
    pub fn push(&mut self, delta: &str, armed: bool) -> Release {
        if self.stopped {
            return Release {
                text: String::new(),
                stop: None,
            };
        }
        self.held.push_str(delta);
        if !armed {
            return Release {
                text: std::mem::take(&mut self.held),
                stop: None,
            };
        }
        if let Some((at, stop)) = self.earliest_match() {
            self.stopped = true;
            let end = if self.include_in_output {
                at + stop.len()
            } else {
                at
            };
            let text = self.held[..end].to_string();
            self.held.clear();
            return Release {
                text,
                stop: Some(stop),
            };
        }
        let keep = self.partial_suffix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Release { text, stop: None }
    }

    /// The stream ended for another reason (length, EOS): what was held back is plain text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn earliest_match(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.clone())))
            .min_by_key(|(at, s)| (*at, std::cmp::Reverse(s.len())))
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop string.
    fn partial_suffix_len(&self) -> usize {
        let held = self.held.as_str();
        self.stops
            .iter()
            .flat_map(|stop| {
                // Candidate suffix starts, on char boundaries, no longer than the stop string.
                let min_start = held.len().saturating_sub(stop.len() - 1);
                held.char_indices()
                    .map(|(i, _)| i)
                    .filter(move |&i| i >= min_start)
                    .find(|&i| stop.starts_with(&held[i..]))
                    .map(|i| held.len() - i)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], deltas: &[&str]) -> (String, Option<String>) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect(), false);
        let mut out = String::new();
        for d in deltas {
            let r = s.push(d, true);
            out.push_str(&r.text);
            if r.stop.is_some() {
                return (out, r.stop);
            }
        }
        out.push_str(&s.flush());
        (out, None)
    }

    #[test]
    fn stop_within_one_delta_cuts_before_it() {
        assert_eq!(
            feed(&["END"], &["hello END world"]),
            ("hello ".into(), Some("END".into()))
        );
    }

    #[test]
    fn stop_spanning_deltas_never_leaks() {
        let mut s = StopStrings::new(vec!["</answer>".into()], false);
        let mut seen = String::new();
        for d in ["The answer is 4", "</ans", "wer", "> more"] {
            let r = s.push(d, true);
            seen.push_str(&r.text);
            assert!(!seen.contains("</"), "partial stop string leaked: {seen:?}");
            if r.stop.is_some() {
                break;
            }
        }
        assert_eq!(seen, "The answer is 4");
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut s = StopStrings::new(vec!["STOP".into()], false);
        assert_eq!(s.push("a ST", true).text, "a ");
        assert_eq!(s.push("ART", true).text, "START");
    }

    #[test]
    fn flush_returns_held_text_at_the_end() {
        assert_eq!(feed(&["xyz"], &["abc", "x"]), ("abcx".into(), None));
    }

    #[test]
    fn earliest_stop_wins_and_include_in_output_keeps_it() {
        let mut s = StopStrings::new(vec!["b".into(), "a".into()], true);
        let r = s.push("xxab", true);
        assert_eq!(r.text, "xxa");
        assert_eq!(r.stop.as_deref(), Some("a"));
        assert_eq!(s.push("more", true).text, "", "nothing after a stop");
    }

    #[test]
    fn unarmed_text_passes_unchecked() {
        let mut s = StopStrings::new(vec!["x".into()], false);
        assert_eq!(s.push("axb", false).text, "axb");
        assert_eq!(s.push("cxd", true).stop.as_deref(), Some("x"));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(
            feed(&["ü!"], &["grüß ü", "!"]),
            ("grüß ".into(), Some("ü!".into()))
        );
        assert_eq!(feed(&["éa"], &["né", "b"]), ("néb".into(), None));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        assert!(StopStrings::new(vec![String::new()], false).is_empty());
        assert_eq!(feed(&[""], &["abc"]), ("abc".into(), None));
    }
}
