//! The usage each format reads from real-looking answers, JSON and streamed, however the
//! body is cut into chunks, and within the reader's memory caps.

use sluice_usage::{ReaderLimits, Usage, UsageFormat, UsageReader};

const JSON: &str = "application/json";
const SSE: &str = "text/event-stream";

const OPENAI_ANSWER: &str = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"The image shows a wooden boardwalk through a green meadow.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;

/// A Chat Completions stream with `stream_options.include_usage`.
const OPENAI_STREAM: &str = r#"data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"content":"Hello! How can I \"usage\" help?"},"logprobs":null,"finish_reason":null}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}

data: [DONE]

"#;

/// The same stream without `include_usage`: no chunk says what was used.
const OPENAI_STREAM_WITHOUT_USAGE: &str = r#"data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello!"},"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}

data: [DONE]

"#;

const ANTHROPIC_ANSWER: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},"output_tokens":9,"service_tier":"standard"}}"#;

/// An Anthropic Messages stream, up to the end of its text (no `message_delta` yet).
const ANTHROPIC_STREAM_HEAD: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_01QC4g3HwBThD4BaNtBckFDJ","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! Your \"usage\": {\"output_tokens\": 999} is fine."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

"#;

const ANTHROPIC_STREAM_TAIL: &str = r#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"#;

const RESPONSES_ANSWER: &str = r#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"o4-mini-2025-04-16","output":[{"type":"reasoning","id":"rs_67ccd3a9","summary":[]},{"type":"message","id":"msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41","status":"completed","role":"assistant","content":[{"type":"output_text","text":"The image depicts a scenic landscape.","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":"medium","summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1024},"output_tokens":300,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":1500},"user":null,"metadata":{}}"#;

const RESPONSES_STREAM: &str = r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}

event: response.in_progress
data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","output":[],"usage":null}}

event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":"Hi there!"}

event: response.output_text.done
data: {"type":"response.output_text.done","sequence_number":5,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"text":"Hi there!"}

event: response.completed
data: {"type":"response.completed","sequence_number":7,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there!","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}}

"#;

fn format(name: &str) -> UsageFormat {
    name.parse().unwrap()
}

fn usage(input: u64, cached: Option<u64>, output: u64, total: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        total_tokens: total,
    }
}

/// The usage `body` reports, fed in one chunk.
fn read(format_name: &str, content_type: &str, body: &str) -> Option<Usage> {
    read_chunks(format_name, content_type, &[body.as_bytes()])
}

fn read_chunks(format_name: &str, content_type: &str, chunks: &[&[u8]]) -> Option<Usage> {
    let mut reader = reader(format_name, content_type);
    for chunk in chunks {
        reader.feed(chunk);
    }
    reader.finish()
}

fn reader(format_name: &str, content_type: &str) -> UsageReader {
    UsageReader::new(
        format(format_name),
        Some(content_type),
        ReaderLimits::default(),
    )
}

fn anthropic_stream() -> String {
    format!("{ANTHROPIC_STREAM_HEAD}{ANTHROPIC_STREAM_TAIL}")
}

#[test]
fn openai_answers_and_streams() {
    let answer = usage(1117, Some(1024), 46, 1163);
    assert_eq!(read("openai", JSON, OPENAI_ANSWER), Some(answer));
    assert_eq!(
        read("openai", SSE, OPENAI_STREAM),
        Some(usage(9, Some(0), 12, 21))
    );
    // Without include_usage, nothing in the stream says what it used.
    assert_eq!(read("openai", SSE, OPENAI_STREAM_WITHOUT_USAGE), None);
}

#[test]
fn an_openai_stream_is_known_only_from_its_usage_chunk() {
    let usage_chunk = OPENAI_STREAM.find(r#""choices":[]"#).unwrap();
    let mut reader = reader("openai", SSE);
    reader.feed(&OPENAI_STREAM.as_bytes()[..usage_chunk]);
    assert_eq!(reader.usage(), None, "chunks with usage: null say nothing");
    reader.feed(&OPENAI_STREAM.as_bytes()[usage_chunk..]);
    assert_eq!(reader.usage(), Some(usage(9, Some(0), 12, 21)));
}

#[test]
fn anthropic_answers_add_up_the_cache_counts() {
    // 12 uncached + 100 written to the cache + 2048 read from it.
    let expected = usage(2160, Some(2048), 9, 2169);
    assert_eq!(read("anthropic", JSON, ANTHROPIC_ANSWER), Some(expected));
}

#[test]
fn anthropic_streams_take_input_from_the_start_and_output_from_the_last_delta() {
    let expected = usage(2272, Some(1800), 15, 2287);
    assert_eq!(read("anthropic", SSE, &anthropic_stream()), Some(expected));
}

#[test]
fn an_anthropic_stream_cut_before_its_delta_has_no_final_usage() {
    let mut reader = reader("anthropic", SSE);
    assert_eq!(reader.usage(), None);
    reader.feed(ANTHROPIC_STREAM_HEAD.as_bytes());
    // The client went away before message_delta: so far, the input and the 1 output
    // token message_start reported. Text about "usage" in the content changes nothing.
    assert_eq!(reader.usage(), Some(usage(2272, Some(1800), 1, 2273)));
    // Cut in the middle of message_delta's line: the half line is not read, and the
    // first token is not the answer's output, so there is no usage to settle at (the
    // caller keeps its estimate; settling at 1 output token let a client that cut every
    // stream just before its end stream for free).
    let half = &ANTHROPIC_STREAM_TAIL[..ANTHROPIC_STREAM_TAIL.len() / 2];
    reader.feed(half.as_bytes());
    assert_eq!(reader.finish(), None);
}

#[test]
fn an_anthropic_stream_cut_after_its_delta_has_its_usage() {
    // message_delta and its blank line arrived; message_stop did not.
    let tail = ANTHROPIC_STREAM_TAIL
        .find("event: message_stop")
        .map_or(ANTHROPIC_STREAM_TAIL, |end| &ANTHROPIC_STREAM_TAIL[..end]);
    let mut reader = reader("anthropic", SSE);
    reader.feed(ANTHROPIC_STREAM_HEAD.as_bytes());
    reader.feed(tail.as_bytes());
    assert_eq!(reader.finish(), Some(usage(2272, Some(1800), 15, 2287)));
}

#[test]
fn anthropic_deltas_may_update_every_count() {
    // Newer streams repeat the input counts in message_delta, as running totals too.
    let stream = format!(
        "{ANTHROPIC_STREAM_HEAD}event: message_delta\ndata: {}\n\n",
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"input_tokens":500,"cache_creation_input_tokens":null,"cache_read_input_tokens":1800,"output_tokens":40}}"#
    );
    assert_eq!(
        read("anthropic", SSE, &stream),
        Some(usage(2300, Some(1800), 40, 2340))
    );
}

#[test]
fn openai_responses_answers_and_streams() {
    let answer = usage(1200, Some(1024), 300, 1500);
    assert_eq!(
        read("openai_responses", JSON, RESPONSES_ANSWER),
        Some(answer)
    );
    let streamed = usage(37, Some(0), 11, 48);
    assert_eq!(
        read("openai_responses", SSE, RESPONSES_STREAM),
        Some(streamed)
    );
    // A response cut at max_output_tokens ends with response.incomplete, usage and all.
    let incomplete = RESPONSES_STREAM.replace("response.completed", "response.incomplete");
    assert_eq!(read("openai_responses", SSE, &incomplete), Some(streamed));
    // Until the last event, nothing is known.
    let last = RESPONSES_STREAM.find("event: response.completed").unwrap();
    assert_eq!(
        read("openai_responses", SSE, &RESPONSES_STREAM[..last]),
        None
    );
}

#[test]
fn auto_reads_every_format() {
    let cases = [
        (JSON, OPENAI_ANSWER.to_owned(), "openai"),
        (SSE, OPENAI_STREAM.to_owned(), "openai"),
        (JSON, ANTHROPIC_ANSWER.to_owned(), "anthropic"),
        (SSE, anthropic_stream(), "anthropic"),
        (JSON, RESPONSES_ANSWER.to_owned(), "openai_responses"),
        (SSE, RESPONSES_STREAM.to_owned(), "openai_responses"),
    ];
    for (content_type, body, own_format) in cases {
        let own = read(own_format, content_type, &body);
        assert!(own.is_some(), "{own_format}");
        assert_eq!(
            read("auto", content_type, &body),
            own,
            "{own_format}: {body}"
        );
    }
    assert_eq!(read("auto", SSE, OPENAI_STREAM_WITHOUT_USAGE), None);
    // An Anthropic stream cut before its message_delta has no final usage either way.
    assert_eq!(read("auto", SSE, ANTHROPIC_STREAM_HEAD), None);
}

#[test]
fn a_format_does_not_read_another_s_stream() {
    assert_eq!(read("openai", SSE, &anthropic_stream()), None);
    assert_eq!(read("anthropic", SSE, OPENAI_STREAM), None);
    assert_eq!(read("anthropic", SSE, RESPONSES_STREAM), None);
    assert_eq!(read("openai_responses", SSE, OPENAI_STREAM), None);
}

#[test]
fn a_json_pointer_reads_one_number_as_output_tokens() {
    let answer = r#"{"result": "ok", "meta": {"billed_units": {"tokens": 42.0}}}"#;
    let pointer = "/meta/billed_units/tokens";
    assert_eq!(read(pointer, JSON, answer), Some(Usage::new(0, 42)));
    // In a stream, the last event where it points at a number wins; `null` is no number.
    assert_eq!(
        read("/usage/total_tokens", SSE, OPENAI_STREAM),
        Some(Usage::new(0, 21))
    );
    let stream =
        "data: {\"n\": 1}\n\ndata: {\"n\": 5}\n\ndata: {\"n\": null}\n\ndata: {\"x\": 1}\n\n";
    assert_eq!(read("/n", SSE, stream), Some(Usage::new(0, 5)));
    // Where it points at no whole number, the usage is unknown.
    assert_eq!(read("/result", JSON, answer), None);
    assert_eq!(read("/meta/missing", JSON, answer), None);
    assert_eq!(read("/n", JSON, r#"{"n": 1.5}"#), None);
}

/// Every way of cutting a stream into chunks gives the same usage as the whole stream.
#[test]
fn any_split_of_a_stream_gives_the_same_usage() {
    let streams = [
        ("openai", OPENAI_STREAM.to_owned()),
        ("anthropic", anthropic_stream()),
        ("openai_responses", RESPONSES_STREAM.to_owned()),
        ("auto", anthropic_stream()),
    ];
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    for (format_name, stream) in streams {
        for end in ["\n", "\r\n", "\r"] {
            let stream = stream.replace('\n', end);
            let bytes = stream.as_bytes();
            let whole = read(format_name, SSE, &stream);
            assert!(whole.is_some(), "{format_name} with {end:?}");

            let one_byte_chunks: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(read_chunks(format_name, SSE, &one_byte_chunks), whole);
            for cut in 0..=bytes.len() {
                let (head, tail) = bytes.split_at(cut);
                let split = read_chunks(format_name, SSE, &[head, tail]);
                assert_eq!(split, whole, "{format_name} with {end:?} cut at {cut}");
            }
            for _ in 0..200 {
                let chunks = random.split(bytes);
                assert_eq!(
                    read_chunks(format_name, SSE, &chunks),
                    whole,
                    "{format_name}"
                );
            }
        }
    }
}

#[test]
fn comments_multi_line_data_and_no_space_after_data() {
    // A keep-alive comment, `data:` without its space, one JSON spread over three lines.
    let stream = ": PROCESSING\n\n: PROCESSING\ndata:{\"choices\":[],\ndata: \"usage\": {\"prompt_tokens\": 3,\ndata:  \"completion_tokens\": 4}}\n\ndata:[DONE]\n\n";
    for end in ["\n", "\r\n", "\r"] {
        let stream = stream.replace('\n', end);
        assert_eq!(
            read("openai", SSE, &stream),
            Some(Usage::new(3, 4)),
            "{end:?}"
        );
    }
}

#[test]
fn a_line_over_the_cap_is_skipped_and_what_follows_is_read() {
    let limits = ReaderLimits {
        max_event_bytes: 4096,
        ..ReaderLimits::default()
    };
    let mut reader = UsageReader::new(format("anthropic"), Some(SSE), limits);
    reader.feed(ANTHROPIC_STREAM_HEAD.as_bytes());
    // A content delta far over the cap, arriving in pieces, never ended by a line end
    // for a long while: the reader holds no more than the cap of it.
    reader.feed(
        br#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""#,
    );
    let piece = vec![b'a'; 64 * 1024];
    for _ in 0..64 {
        reader.feed(&piece);
    }
    reader.feed(b"\"}}\n\n");
    assert!(reader.over_limit());
    reader.feed(ANTHROPIC_STREAM_TAIL.as_bytes());
    assert_eq!(reader.finish(), Some(usage(2272, Some(1800), 15, 2287)));
}

#[test]
fn a_json_answer_over_the_cap_is_read_from_its_end() {
    let limits = |max_json_bytes| ReaderLimits {
        max_json_bytes,
        ..ReaderLimits::default()
    };
    let exact = OPENAI_ANSWER.len();
    let mut reader = UsageReader::new(format("openai"), Some(JSON), limits(exact));
    for chunk in OPENAI_ANSWER.as_bytes().chunks(100) {
        reader.feed(chunk);
    }
    assert!(!reader.over_limit());
    assert_eq!(reader.usage(), None, "a JSON answer is known once whole");
    assert_eq!(reader.finish(), Some(usage(1117, Some(1024), 46, 1163)));

    // Over the cap, its end still tells the usage: a client that makes the answer big
    // (`top_logprobs`, echoed `instructions`) does not make it cheap.
    let mut reader = UsageReader::new(format("openai"), Some(JSON), limits(exact - 1));
    for chunk in OPENAI_ANSWER.as_bytes().chunks(100) {
        reader.feed(chunk);
    }
    assert!(reader.over_limit());
    assert_eq!(reader.finish(), Some(usage(1117, Some(1024), 46, 1163)));
    // Cut off before its usage is whole: unknown.
    let cut = &OPENAI_ANSWER[..OPENAI_ANSWER.rfind("\"usage\"").expect("usage") + 20];
    let mut reader = UsageReader::new(format("openai"), Some(JSON), limits(100));
    reader.feed(cut.as_bytes());
    assert_eq!(reader.finish(), None);
}

/// The Responses API's last event repeats the request's `instructions` and the whole
/// output: a client that sends 2 MiB of instructions makes it longer than a stream's
/// event may be kept, and its usage is still read.
#[test]
fn a_stream_event_over_the_cap_is_read_from_its_start_and_end() {
    let instructions = "be brief. ".repeat(200_000);
    let completed = serde_json::json!({
        "type": "response.completed",
        "response": {
            "instructions": instructions,
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}],
            "usage": {"input_tokens": 500_000, "output_tokens": 20_000, "total_tokens": 520_000,
                      "input_tokens_details": {"cached_tokens": 0}}
        }
    });
    let stream = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\"}}\n\nevent: response.completed\ndata: {completed}\n\n"
    );
    assert!(stream.len() > 1 << 20, "over the 1 MiB an event may be");
    for name in ["openai_responses", "auto"] {
        let mut reader = UsageReader::new(format(name), Some(SSE), ReaderLimits::default());
        for chunk in stream.as_bytes().chunks(16 << 10) {
            reader.feed(chunk);
        }
        assert!(reader.over_limit());
        let found = reader.finish().expect("usage read from the event's end");
        assert_eq!(
            (found.input_tokens, found.output_tokens),
            (500_000, 20_000),
            "{name}"
        );
    }
}

#[test]
fn the_content_type_decides_how_the_body_is_read() {
    for content_type in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
    ] {
        assert!(
            read("openai", content_type, OPENAI_ANSWER).is_some(),
            "{content_type}"
        );
    }
    assert!(read("openai", "text/event-stream; charset=utf-8", OPENAI_STREAM).is_some());
    // A stream read as JSON, JSON read as a stream, and other types: nothing.
    assert_eq!(read("openai", JSON, OPENAI_STREAM), None);
    assert_eq!(read("openai", SSE, OPENAI_ANSWER), None);
    assert_eq!(read("openai", "text/plain", OPENAI_ANSWER), None);
    assert_eq!(read("openai", "application/jsonx", OPENAI_ANSWER), None);
    let mut reader = UsageReader::new(format("openai"), None, ReaderLimits::default());
    reader.feed(OPENAI_ANSWER.as_bytes());
    assert_eq!(reader.finish(), None);
}

#[test]
fn answers_without_usage_are_unknown() {
    let error = r#"{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}"#;
    for format_name in [
        "openai",
        "anthropic",
        "openai_responses",
        "auto",
        "/usage/total_tokens",
    ] {
        assert_eq!(read(format_name, JSON, error), None, "{format_name}");
        assert_eq!(
            read(format_name, JSON, "{\"usage\": "),
            None,
            "{format_name}"
        );
        assert_eq!(read(format_name, JSON, ""), None, "{format_name}");
        assert_eq!(
            read(format_name, SSE, "data: [DONE]\n\n"),
            None,
            "{format_name}"
        );
    }
}

/// A small deterministic generator: the same splits on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `bytes` cut at random places, into chunks of 0 to 63 bytes.
    fn split<'a>(&mut self, mut bytes: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        while !bytes.is_empty() {
            let len = (self.next() % 64) as usize;
            let (chunk, rest) = bytes.split_at(len.min(bytes.len()));
            chunks.push(chunk);
            bytes = rest;
        }
        chunks
    }
}
