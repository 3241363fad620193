//! One line per error for people: an error and its causes, outermost first, joined by
//! `": "`, with every cause whose text the line already holds left out.
//!
//! Many errors in this workspace (and in the crates they wrap) put their source's text in
//! their own message *and* return it from `source()`; printing the chain naively (anyhow's
//! `{:#}` or its `Caused by:` list) then repeats the same words two or three times. Every
//! binary prints errors through [`report`], so an operator reads each cause once.

use std::error::Error;

/// The error and its causes on one line, without repeated causes.
pub fn report(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("No space left on device (os error 28)")
        }
    }
    impl Error for Leaf {}

    /// Repeats its source's text in its own message, as thiserror's `{source}` does.
    #[derive(Debug)]
    struct Wrapper(Leaf);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "put of `a/b` failed: {}", self.0)
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[derive(Debug)]
    struct Context(Wrapper);
    impl std::fmt::Display for Context {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("uploading disk 0f")
        }
    }
    impl Error for Context {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_appears_once() {
        let line = report(&Context(Wrapper(Leaf)));
        assert_eq!(
            line,
            "uploading disk 0f: put of `a/b` failed: No space left on device (os error 28)"
        );
        assert_eq!(line.matches("No space left").count(), 1);
    }
}
