//! The cache key of a rootfs image: a hash of everything that goes into it.

use sha2::{Digest, Sha256};

/// Bump when the builder changes what it puts in an image, so old cached images are not reused.
/// v2: the stimulus is instrumented (`-fsanitize-coverage=trace-pc`) and linked with rrr's runtime.
/// v3: its `rdrand`/`rdseed` are rewritten into traps, and the runtime traps `rdtsc`.
/// v4: its functions call rrr's entry and exit hooks (`-finstrument-functions`), and the agent
/// grants the function-probe port.
pub const BUILDER_VERSION: &str = "rrr-rootfs image v4";

/// The inputs of one image, as bytes.
pub struct KeyInputs<'a> {
    pub stimulus_name: &'a str,
    pub stimulus_source: &'a [u8],
    pub m32: bool,
    pub extra_cflags: &'a [String],
    pub compiler: &'a str,
    pub busybox: &'a [u8],
}

/// Hex sha256 over length-prefixed fields, so no two different inputs can run together into
/// the same byte stream.
struct Fields(Sha256);

impl Fields {
    fn new(kind: &str) -> Self {
        let mut fields = Fields(Sha256::new());
        fields.add(BUILDER_VERSION.as_bytes());
        fields.add(kind.as_bytes());
        fields
    }

    fn add(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn stimulus(&mut self, inputs: &KeyInputs) {
        self.add(inputs.stimulus_name.as_bytes());
        self.add(inputs.stimulus_source);
        self.add(&[u8::from(inputs.m32)]);
        self.add(&(inputs.extra_cflags.len() as u64).to_le_bytes());
        for flag in inputs.extra_cflags {
            self.add(flag.as_bytes());
        }
        self.add(inputs.compiler.as_bytes());
        // The runtime is linked into every stimulus, so a change to it is a new binary.
        for (name, text) in rrr_guest::agent::SOURCES {
            if name != "agent.c" {
                self.add(name.as_bytes());
                self.add(text.as_bytes());
            }
        }
    }

    fn system(&mut self, compiler: &str, busybox: &[u8]) {
        self.add(compiler.as_bytes());
        for (name, text) in rrr_guest::agent::SOURCES {
            self.add(name.as_bytes());
            self.add(text.as_bytes());
        }
        self.add(&Sha256::digest(busybox));
    }

    fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The key of an image with the stimulus inside.
pub fn cache_key(inputs: &KeyInputs) -> String {
    let mut fields = Fields::new("image with stimulus");
    fields.stimulus(inputs);
    fields.system(inputs.compiler, inputs.busybox);
    fields.finish()
}

/// The key of the base image (agent and busybox, no stimulus): shared by every stimulus, and so
/// by one snapshot per kernel.
pub fn base_key(compiler: &str, busybox: &[u8]) -> String {
    let mut fields = Fields::new("base image");
    fields.system(compiler, busybox);
    fields.finish()
}

/// The key of a compiled stimulus on its own.
pub fn stimulus_key(inputs: &KeyInputs) -> String {
    let mut fields = Fields::new("stimulus binary");
    fields.stimulus(inputs);
    fields.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Inputs {
        name: &'static str,
        source: &'static [u8],
        m32: bool,
        flags: Vec<String>,
        compiler: &'static str,
        busybox: &'static [u8],
    }

    impl Inputs {
        fn key(&self) -> String {
            cache_key(&KeyInputs {
                stimulus_name: self.name,
                stimulus_source: self.source,
                m32: self.m32,
                extra_cflags: &self.flags,
                compiler: self.compiler,
                busybox: self.busybox,
            })
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = Inputs {
            name: "a.c",
            source: b"int main(){}",
            m32: false,
            flags: vec!["-DX".into()],
            compiler: "12.2.0",
            busybox: b"bb",
        };
        assert_eq!(base.key(), base.clone().key());
        let change = |f: &dyn Fn(&mut Inputs)| {
            let mut inputs = base.clone();
            f(&mut inputs);
            inputs.key()
        };
        let variants = [
            change(&|i| i.name = "b.c"),
            change(&|i| i.source = b"int main(){ }"),
            change(&|i| i.m32 = true),
            change(&|i| i.flags.clear()),
            change(&|i| i.flags = vec!["-D".into(), "X".into()]),
            change(&|i| i.compiler = "13.1.0"),
            change(&|i| i.busybox = b"bb2"),
        ];
        for variant in &variants {
            assert_ne!(&base.key(), variant);
        }
        let stimulus_only = |i: &Inputs| {
            stimulus_key(&KeyInputs {
                stimulus_name: i.name,
                stimulus_source: i.source,
                m32: i.m32,
                extra_cflags: &i.flags,
                compiler: i.compiler,
                busybox: i.busybox,
            })
        };
        let mut other_busybox = base.clone();
        other_busybox.busybox = b"bb2";
        assert_eq!(stimulus_only(&base), stimulus_only(&other_busybox));
        let mut other_source = base.clone();
        other_source.source = b"int main(){return 1;}";
        assert_ne!(stimulus_only(&base), stimulus_only(&other_source));
        assert_ne!(base_key("12.2.0", b"bb"), base_key("12.2.0", b"bb2"));
        assert_ne!(base_key("12.2.0", b"bb"), base.key());
    }
}
