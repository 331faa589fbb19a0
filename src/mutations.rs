//! Seeded inputs changed a few bytes at a time, for the smoke tests that run each fuzz
//! target's checks on every `cargo test` (cargo-fuzz, in `fuzz/`, runs them for real):
//! deterministic, so a failure is the same on every run.

/// A xorshift stream of choices, and the edits made with them.
pub(crate) struct Mutations {
    state: u64,
}

/// What the third kind of edit does: drop the byte there, or everything from there on.
#[derive(Clone, Copy)]
pub(crate) enum Shorten {
    Byte,
    Rest,
}

impl Mutations {
    pub(crate) fn new(seed: u64) -> Mutations {
        Mutations { state: seed }
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// Up to `most - 1` edits of `input` at `from` or after: a byte replaced, a byte
    /// inserted, or the input shortened there.
    pub(crate) fn mutate(&mut self, input: &mut Vec<u8>, from: usize, most: u64, shorten: Shorten) {
        for _ in 0..(self.next() % most) {
            let choice = self.next();
            let span = input.len().saturating_sub(from) + 1;
            let at = from + (choice >> 8) as usize % span;
            let byte = (choice >> 32) as u8;
            match (choice % 3, shorten) {
                (0, _) if at < input.len() => input[at] = byte,
                (1, _) => input.insert(at.min(input.len()), byte),
                (_, Shorten::Byte) if at < input.len() => {
                    input.remove(at);
                }
                (_, Shorten::Rest) if at < input.len() => input.truncate(at),
                _ => {}
            }
        }
    }
}
