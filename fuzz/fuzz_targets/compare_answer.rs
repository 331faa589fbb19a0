//! Fuzzes what a forge answers when the relay asks which files a push changed (a source's
//! `compare`). The input layout and the invariants are in `hookrelay::compare::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hookrelay::compare::fuzz::answer(data);
});
