//! The one form of HTTP `Range` the repo depot needs: a single byte range,
//! `bytes=START-` or `bytes=START-END` (RFC 9110 §14.1.2). Other forms
//! (suffix ranges, multiple ranges) are ignored, which RFC 9110 allows: the
//! whole file is sent with 200.

/// What to send for a file of `length` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeDecision {
    Whole,
    /// Inclusive byte positions.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

pub fn decide(header: Option<&str>, length: u64) -> RangeDecision {
    let Some(spec) = header.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return RangeDecision::Whole;
    };
    let Some((start, end)) = spec.split_once('-') else {
        return RangeDecision::Whole;
    };
    if spec.contains(',') {
        return RangeDecision::Whole;
    }
    let Ok(start) = start.trim().parse::<u64>() else {
        return RangeDecision::Whole;
    };
    let end = match end.trim() {
        "" => length.saturating_sub(1),
        end => match end.parse::<u64>() {
            Ok(end) if end >= start => end.min(length.saturating_sub(1)),
            _ => return RangeDecision::Whole,
        },
    };
    if start >= length {
        return RangeDecision::Unsatisfiable;
    }
    RangeDecision::Partial { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_are_honoured_and_the_rest_ignored() {
        assert_eq!(decide(None, 100), RangeDecision::Whole);
        assert_eq!(decide(Some("bytes=10-"), 100), RangeDecision::Partial { start: 10, end: 99 });
        assert_eq!(decide(Some("bytes=10-19"), 100), RangeDecision::Partial { start: 10, end: 19 });
        assert_eq!(decide(Some("bytes=90-500"), 100), RangeDecision::Partial { start: 90, end: 99 });
        assert_eq!(decide(Some("bytes=100-"), 100), RangeDecision::Unsatisfiable);
        assert_eq!(decide(Some("bytes=-10"), 100), RangeDecision::Whole, "suffix ranges are not used");
        assert_eq!(decide(Some("bytes=0-1,5-6"), 100), RangeDecision::Whole);
        assert_eq!(decide(Some("items=1-2"), 100), RangeDecision::Whole);
        assert_eq!(decide(Some("bytes=5-2"), 100), RangeDecision::Whole);
    }
}
