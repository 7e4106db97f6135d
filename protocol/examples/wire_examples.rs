//! Prints sections 13.1 and 13.2 of `PROTOCOL.md`: every example message as
//! readable MessagePack notation and as the exact frame bytes.
//!
//! Run `cargo run -p tapledger-protocol --example wire_examples` and paste the
//! output over those sections (from "### 13.1" up to "## 14."); the protocol
//! crate's tests check that the document shows these bytes. It reads only
//! its own constants: no files, no network.

use tapledger_protocol::examples::{client_examples, hex_dump, node_examples};
use tapledger_protocol::{FRAME_HEADER_BYTES, encode_frame_to_vec};

fn main() {
    println!("### 13.1 Client messages\n");
    for (title, message) in client_examples() {
        print_example(title, &encode_frame_to_vec(&message).expect("examples fit"));
    }
    println!("### 13.2 Node messages\n");
    for (title, message) in node_examples() {
        print_example(title, &encode_frame_to_vec(&message).expect("examples fit"));
    }
}

fn print_example(title: &str, frame: &[u8]) {
    let body = &frame[FRAME_HEADER_BYTES..];
    println!("#### {title}\n");
    println!(
        "{} bytes: prefix `{}` then a {}-byte body.\n",
        frame.len(),
        hex_dump(&frame[..FRAME_HEADER_BYTES]),
        body.len()
    );
    let mut at = 0;
    let mut text = String::new();
    describe(body, &mut at, 0, &mut text);
    println!("```text\n{text}\n```\n");
    println!("```hex\n{}\n```\n", hex_dump(frame));
}

/// Writes the value at `at` in a JSON-like notation: `bin` as `h'..'`.
/// The examples are our own well-formed encodings, so this assumes validity.
fn describe(body: &[u8], at: &mut usize, indent: usize, out: &mut String) {
    let marker = body[*at];
    *at += 1;
    let pad = "  ".repeat(indent + 1);
    let close_pad = "  ".repeat(indent);
    match marker {
        0x00..=0x7f => out.push_str(&marker.to_string()),
        0x80..=0x8f | 0xde | 0xdf => {
            let count = container_len(body, at, marker, 0x80);
            if count == 0 {
                out.push_str("{}");
                return;
            }
            out.push_str("{\n");
            for index in 0..count {
                out.push_str(&pad);
                describe(body, at, indent + 1, out);
                out.push_str(": ");
                describe(body, at, indent + 1, out);
                out.push_str(if index + 1 < count { ",\n" } else { "\n" });
            }
            out.push_str(&close_pad);
            out.push('}');
        }
        0x90..=0x9f | 0xdc | 0xdd => {
            let count = container_len(body, at, marker, 0x90);
            // Arrays of maps read better one element a line.
            let multi_line = count > 0 && matches!(body[*at], 0x80..=0x8f | 0xde | 0xdf);
            out.push('[');
            for index in 0..count {
                if multi_line {
                    out.push('\n');
                    out.push_str(&pad);
                }
                describe(body, at, indent + 1, out);
                if index + 1 < count {
                    out.push_str(if multi_line { "," } else { ", " });
                }
            }
            if multi_line {
                out.push('\n');
                out.push_str(&close_pad);
            }
            out.push(']');
        }
        0xa0..=0xbf | 0xd9 | 0xda | 0xdb => {
            let len = match marker {
                0xd9 => read_uint(body, at, 1),
                0xda => read_uint(body, at, 2),
                0xdb => read_uint(body, at, 4),
                _ => u64::from(marker & 0x1f),
            } as usize;
            let text = std::str::from_utf8(&body[*at..*at + len]).expect("utf-8 example");
            *at += len;
            out.push_str(&format!("{text:?}"));
        }
        0xc4..=0xc6 => {
            let width = 1 << (marker - 0xc4);
            let len = read_uint(body, at, width) as usize;
            let bytes: String = body[*at..*at + len]
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            *at += len;
            out.push_str(&format!("h'{bytes}'"));
        }
        0xc0 => out.push_str("nil"),
        0xc2 => out.push_str("false"),
        0xc3 => out.push_str("true"),
        0xcc..=0xcf => {
            let width = 1 << (marker - 0xcc);
            out.push_str(&read_uint(body, at, width).to_string());
        }
        other => panic!("the examples use no marker {other:#04x}"),
    }
}

fn container_len(body: &[u8], at: &mut usize, marker: u8, fix_base: u8) -> u64 {
    match marker {
        0xdc | 0xde => read_uint(body, at, 2),
        0xdd | 0xdf => read_uint(body, at, 4),
        _ => u64::from(marker - fix_base),
    }
}

fn read_uint(body: &[u8], at: &mut usize, width: usize) -> u64 {
    let value = body[*at..*at + width]
        .iter()
        .fold(0u64, |value, byte| (value << 8) | u64::from(*byte));
    *at += width;
    value
}
