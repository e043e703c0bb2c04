//! Server-sent events (the WHATWG `text/event-stream` format), parsed as the bytes arrive
//! in chunks of any size, keeping only each event's `data`.
//!
//! Lines end with `\r\n`, `\n` or `\r`, which may fall into different chunks; a line
//! starting with `:` is a comment; `data:` may or may not be followed by a space; the
//! `data` lines of one event are joined with `\n`, and an empty line ends the event. The
//! other fields (`event`, `id`, `retry`) are of no use here: every format repeats the
//! event's name inside its JSON, so they are skipped.
//!
//! Memory is bounded by `max` bytes for the current line and `max` for the current
//! event's data. A line or an event over it is not kept, and the parser goes on with
//! the next one: an upstream that never ends a line costs `max` bytes, not the stream.
//! Of an event's data over it, only its start and end are kept ([`Tail`]), where its
//! type and its usage are.

use crate::tail::Tail;

/// What the parser hands on at the end of an event.
pub(crate) enum Event<'a> {
    /// The event's data, joined.
    Data(&'a [u8]),
    /// An event whose data was over the cap: its start and end.
    Oversize(&'a Tail),
}

/// The byte order mark a stream may start with, which is not part of its first line.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The parser's state between chunks.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// The longest line, and the longest event's data, that is kept.
    max: usize,
    /// The current line so far, without its end.
    line: Vec<u8>,
    /// The current line went over `max`: the rest of it is skipped.
    line_too_long: bool,
    /// The last byte fed ended a line with `\r`: an `\n` right after it ends no new line.
    after_cr: bool,
    /// No line has ended yet (the first may start with a byte order mark).
    first_line: bool,
    /// The current event's data lines, each followed by `\n`.
    data: Vec<u8>,
    /// A line or the data of the current event went over `max`: the event is dropped.
    event_too_long: bool,
    /// The start and end of the current line, once it went over `max`.
    long_line: Option<Tail>,
    /// The start and end of the current event's data, once it went over `max`.
    long_event: Option<Tail>,
    /// Something was dropped for going over `max`.
    dropped: bool,
}

impl SseParser {
    /// A parser for a new stream that keeps lines and events of at most `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        SseParser {
            max,
            line: Vec::new(),
            line_too_long: false,
            after_cr: false,
            first_line: true,
            data: Vec::new(),
            event_too_long: false,
            long_line: None,
            long_event: None,
            dropped: false,
        }
    }

    /// Whether a line or an event was dropped for being longer than `max`.
    pub(crate) fn dropped(&self) -> bool {
        self.dropped
    }

    /// Takes in the stream's next bytes, calling `on_event` with every event they
    /// complete.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        while let Some(&first) = bytes.first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
            match memchr::memchr2(b'\n', b'\r', bytes) {
                Some(end) => {
                    self.push(&bytes[..end]);
                    self.after_cr = bytes[end] == b'\r';
                    self.end_line(on_event);
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.push(bytes);
                    return;
                }
            }
        }
    }

    /// The stream ended. The standard drops an event the stream ended in the middle of;
    /// this dispatches it instead (a cut event is cut JSON, which reads as nothing, while
    /// a whole one that merely lacks its final empty line still tells its usage).
    pub(crate) fn finish(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        if !self.line.is_empty() || self.line_too_long {
            self.end_line(on_event);
        }
        self.dispatch(on_event);
    }

    /// Adds part of the current line.
    fn push(&mut self, part: &[u8]) {
        if self.line_too_long {
            if let Some(long) = &mut self.long_line {
                long.push(part);
            }
            return;
        }
        if self.line.len() + part.len() > self.max {
            self.line_too_long = true;
            self.dropped = true;
            let mut long = Tail::default();
            long.push(&self.line);
            long.push(part);
            self.long_line = Some(long);
            self.line = Vec::new(); // give the memory back: such lines are rare
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        let mut line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.first_line) && line.starts_with(BOM) {
            line.drain(..BOM.len());
        }
        if std::mem::take(&mut self.line_too_long) {
            // What is left of the event is its start and end, if this was its data.
            let was_too_long = std::mem::replace(&mut self.event_too_long, true);
            if let Some(long) = self
                .long_line
                .take()
                .filter(|long| long.starts_with(b"data"))
            {
                match &mut self.long_event {
                    Some(event) if was_too_long => event.append(&long),
                    _ => {
                        let mut event = Tail::default();
                        event.push(&self.data);
                        event.append(&long);
                        self.long_event = Some(event);
                        self.data = Vec::new();
                    }
                }
            }
        } else {
            self.take_line(&line, on_event);
        }
        line.clear();
        self.line = line; // keep the allocation for the next line
    }

    fn take_line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if line.is_empty() {
            return self.dispatch(on_event);
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None => (line, &[][..]),
        };
        // A comment has an empty field name; other fields are not needed.
        if field != b"data" {
            return;
        }
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if self.event_too_long {
            if let Some(long) = &mut self.long_event {
                long.push(b"\n");
                long.push(value);
            }
            return;
        }
        if self.data.len() + value.len() + 1 > self.max {
            self.event_too_long = true;
            self.dropped = true;
            let mut long = Tail::default();
            long.push(&self.data);
            long.push(value);
            self.long_event = Some(long);
            self.data = Vec::new();
        } else {
            self.data.extend_from_slice(value);
            self.data.push(b'\n');
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        if std::mem::take(&mut self.event_too_long) {
            if let Some(long) = self.long_event.take() {
                on_event(Event::Oversize(&long));
            }
        } else if !self.data.is_empty() {
            self.data.pop(); // the `\n` after the last data line
            on_event(Event::Data(&self.data));
        }
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data of every event in `stream`, fed in one piece.
    fn events(stream: &[u8], max: usize) -> Vec<String> {
        let mut parser = SseParser::new(max);
        let mut found = Vec::new();
        let mut on_event = |event: Event<'_>| {
            if let Event::Data(data) = event {
                found.push(String::from_utf8_lossy(data).into_owned());
            }
        };
        parser.feed(stream, &mut on_event);
        parser.finish(&mut on_event);
        found
    }

    #[test]
    fn events_end_at_empty_lines_whatever_the_line_ends() {
        for end in ["\n", "\r\n", "\r"] {
            let stream = ["data: a", "data: b", "", "data:c", "", ""].join(end);
            assert_eq!(events(stream.as_bytes(), 100), ["a\nb", "c"], "{end:?}");
        }
        // Mixed endings in one stream.
        assert_eq!(
            events(b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", 100),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn data_lines_join_and_other_lines_are_skipped() {
        let stream = b": a comment\nevent: message_delta\nid: 7\nretry: 10\ndata: {\"a\":\ndata:  1}\ndata\n\n";
        assert_eq!(events(stream, 100), ["{\"a\":\n 1}\n"]);
        // An event without data is no event; `data:` alone is an empty one.
        assert_eq!(events(b"event: ping\n\ndata:\n\n", 100), [""]);
        // Only one space after the colon is removed.
        assert_eq!(events(b"data:   x\n\n", 100), ["  x"]);
    }

    #[test]
    fn a_bom_starts_the_stream_not_its_first_field() {
        assert_eq!(events(b"\xEF\xBB\xBFdata: a\n\n", 100), ["a"]);
    }

    #[test]
    fn the_last_event_is_dispatched_at_the_end_without_an_empty_line() {
        assert_eq!(events(b"data: a\n\ndata: b", 100), ["a", "b"]);
        assert_eq!(events(b"data: a\n", 100), ["a"]);
    }

    #[test]
    fn a_crlf_split_between_chunks_is_one_line_end() {
        let mut parser = SseParser::new(100);
        let mut found = Vec::new();
        let mut on_data = |event: Event<'_>| {
            if let Event::Data(data) = event {
                found.push(data.to_vec());
            }
        };
        for chunk in [
            &b"data: a\r"[..],
            b"\ndata: b\r",
            b"\n",
            b"\r",
            b"\ndata: c\r",
            b"\n\r",
            b"\n",
        ] {
            parser.feed(chunk, &mut on_data);
        }
        assert_eq!(found, [b"a\nb".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn lines_and_events_over_the_cap_are_dropped_and_the_stream_goes_on() {
        let long = "x".repeat(50);
        // A long line is dropped with its event; the next event is whole.
        let stream = format!("data: {long}\ndata: a\n\ndata: b\n\n");
        assert_eq!(events(stream.as_bytes(), 20), ["b"]);
        // Short lines that add up to too much data: the event is dropped.
        let stream = "data: 0123456789\n".repeat(5) + "\ndata: c\n\n";
        assert_eq!(events(stream.as_bytes(), 20), ["c"]);
        // A long comment costs the event it stands in, nothing else.
        let stream = format!(":{long}\n\ndata: d\n\n");
        assert_eq!(events(stream.as_bytes(), 20), ["d"]);

        let mut parser = SseParser::new(20);
        parser.feed(long.as_bytes(), &mut |_| {});
        assert!(parser.dropped());
        assert!(parser.line.capacity() <= 20, "a long line is not kept");
    }

    #[test]
    fn an_event_over_the_cap_hands_on_its_usage() {
        let long = format!(
            r#"{{"type":"response.completed","pad":"{}","usage":{{"input_tokens":5}}}}"#,
            "z".repeat(500)
        );
        for stream in [
            format!("data: {long}\n\ndata: b\n\n"),
            // Data lines that add up to too much.
            format!(
                "data: {}\ndata: {}\n\ndata: b\n\n",
                &long[..300],
                &long[300..]
            ),
        ] {
            let mut parser = SseParser::new(200);
            let mut usage = Vec::new();
            let mut data = Vec::new();
            let mut on_event = |event: Event<'_>| match event {
                Event::Data(d) => data.push(d.to_vec()),
                Event::Oversize(long) => usage.push(long.event_usage()),
            };
            parser.feed(stream.as_bytes(), &mut on_event);
            parser.finish(&mut on_event);
            assert_eq!(data, [b"b".to_vec()]);
            assert_eq!(
                usage,
                [Some(
                    serde_json::json!({"type": "response.completed", "response": {"usage": {"input_tokens": 5}}})
                )]
            );
        }
        // A long comment hands on nothing.
        let mut parser = SseParser::new(20);
        let mut seen = 0;
        parser.feed(format!(":{}\n\n", "c".repeat(50)).as_bytes(), &mut |_| {
            seen += 1
        });
        assert_eq!(seen, 0);
    }
}
