//! NATS subjects and subject filters (`*` matches one token, `>` one or more trailing tokens).
//!
//! The node uses these to decide which local messages it signs (`publish`), which remote
//! operations it accepts (`subscribe`) and whether a configuration would route a subject both
//! ways.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject {0:?} has an empty token")]
    EmptyToken(String),
    #[error("subject {0:?} contains whitespace")]
    Whitespace(String),
    #[error("subject {0:?} contains a wildcard; a concrete subject is needed here")]
    Wildcard(String),
    #[error("filter {0:?} uses '>' before its last token")]
    TailNotLast(String),
    #[error("filter {0:?} uses a wildcard inside a token")]
    PartialWildcard(String),
}

fn check_tokens(text: &str) -> Result<(), SubjectError> {
    if text.is_empty() {
        return Err(SubjectError::Empty);
    }
    if text.chars().any(char::is_whitespace) {
        return Err(SubjectError::Whitespace(text.into()));
    }
    if text.split('.').any(str::is_empty) {
        return Err(SubjectError::EmptyToken(text.into()));
    }
    Ok(())
}

/// Checks a concrete subject (what a message is published on).
pub fn validate_subject(subject: &str) -> Result<(), SubjectError> {
    check_tokens(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(SubjectError::Wildcard(subject.into()));
    }
    Ok(())
}

/// Checks a filter (what a config lists).
pub fn validate_filter(filter: &str) -> Result<(), SubjectError> {
    check_tokens(filter)?;
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if *token == ">" && i + 1 != tokens.len() {
            return Err(SubjectError::TailNotLast(filter.into()));
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            return Err(SubjectError::PartialWildcard(filter.into()));
        }
    }
    Ok(())
}

/// True when the concrete `subject` matches `filter`.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (filter_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when some concrete subject matches both filters.
pub fn overlap(a: &str, b: &str) -> bool {
    let a: Vec<&str> = a.split('.').collect();
    let b: Vec<&str> = b.split('.').collect();
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => i += 1,
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every subject that matches `filter` also matches `pattern` (a stream capturing
/// `pattern` stores everything published on `filter`).
pub fn covers(pattern: &str, filter: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut filter_tokens = filter.split('.');
    loop {
        match (pattern_tokens.next(), filter_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(f)) if f != ">" => {}
            (Some(p), Some(f)) if p == f && p != "*" && p != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The filters of `wanted` that no pattern of `captured` covers.
pub fn uncovered<'a, S: AsRef<str>>(captured: &[S], wanted: &'a [String]) -> Vec<&'a str> {
    wanted
        .iter()
        .map(String::as_str)
        .filter(|filter| !captured.iter().any(|p| covers(p.as_ref(), filter)))
        .collect()
}

/// True when `subject` matches any of `filters`.
pub fn matches_any<S: AsRef<str>>(filters: &[S], subject: &str) -> bool {
    filters
        .iter()
        .any(|filter| matches(filter.as_ref(), subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches("*.b.>", "x.b.y"));
        assert!(matches(">", "anything.at.all"));
    }

    #[test]
    fn covers_means_every_matching_subject_is_captured() {
        assert!(covers("a.>", "a.b"));
        assert!(covers("a.>", "a.*.c"));
        assert!(covers("a.>", "a.>"));
        assert!(!covers("a.>", "a"));
        assert!(covers("a.*", "a.b"));
        assert!(covers("a.*", "a.*"));
        assert!(!covers("a.*", "a.>"));
        assert!(!covers("a.b", "a.*"));
        assert!(!covers("a.b", "a.c"));
        assert!(covers(">", "x.y.z"));
        assert!(!covers("a.*", "a.b.c"));
        let wanted = vec!["a.x".to_string(), "b.>".to_string()];
        assert_eq!(uncovered(&["a.*"], &wanted), vec!["b.>"]);
        assert!(uncovered(&["a.*", "b.>"], &wanted).is_empty());
    }

    proptest! {
        #[test]
        fn a_covered_filter_only_matches_captured_subjects(
            pattern in "[ab*]{1}(\\.[ab*]){0,2}(\\.>)?",
            filter in "[ab*]{1}(\\.[ab*]){0,2}(\\.>)?",
            subject in "[ab]{1}(\\.[ab]){0,4}",
        ) {
            if covers(&pattern, &filter) && matches(&filter, &subject) {
                prop_assert!(matches(&pattern, &subject), "{pattern} covers {filter} but not {subject}");
            }
        }
    }

    #[test]
    fn validation() {
        assert!(validate_subject("a.b").is_ok());
        assert_eq!(
            validate_subject("a.*"),
            Err(SubjectError::Wildcard("a.*".into()))
        );
        assert_eq!(
            validate_subject("a..b"),
            Err(SubjectError::EmptyToken("a..b".into()))
        );
        assert_eq!(validate_subject(""), Err(SubjectError::Empty));
        assert!(validate_filter("a.*.>").is_ok());
        assert_eq!(
            validate_filter("a.>.b"),
            Err(SubjectError::TailNotLast("a.>.b".into()))
        );
        assert_eq!(
            validate_filter("a.b*"),
            Err(SubjectError::PartialWildcard("a.b*".into()))
        );
        assert_eq!(
            validate_filter("a b"),
            Err(SubjectError::Whitespace("a b".into()))
        );
    }

    #[test]
    fn overlapping_filters() {
        assert!(overlap("a.>", "a.b"));
        assert!(overlap("a.*", "*.b"));
        assert!(!overlap("a.*", "b.*"));
        assert!(!overlap("a.*", "a.b.c"));
        assert!(overlap("a.*.c", "a.>"));
        assert!(!overlap("a", "a.>"));
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("c".to_string())
        ]
    }

    fn filter_token() -> impl Strategy<Value = String> {
        prop_oneof![token(), Just("*".to_string())]
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(filter_token(), 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut t, tail)| {
                if tail {
                    t.push(">".into());
                }
                t.join(".")
            })
    }

    proptest! {
        // A witness subject matching both filters exists exactly when `overlap` says so.
        #[test]
        fn overlap_agrees_with_matching(a in filter(), b in filter(),
                                        subject in proptest::collection::vec(token(), 1..6)) {
            let subject = subject.join(".");
            if matches(&a, &subject) && matches(&b, &subject) {
                prop_assert!(overlap(&a, &b), "{a} and {b} both match {subject}");
            }
        }
    }
}
