//! Register spills in ptxas's report, which the build prints as warnings.

/// Register spills or local-memory stack frames in a `ptxas -v` report, one line each.
pub fn spill_warnings(log: &str) -> Vec<String> {
    let mut function = String::new();
    let mut warnings = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim().to_string();
        } else if line.contains("bytes stack frame") {
            let numbers: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if numbers.iter().any(|&n| n > 0) {
                warnings.push(format!("{function}: {}", line.trim()));
            }
        }
    }
    warnings
}
