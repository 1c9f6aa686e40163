//! Plain aligned columns for human output (`--json` is for scripts).
//!
//! Columns are separated by two spaces and padded to their widest cell; the last column is
//! not padded, so a long message there (an invalid record's error) does not widen the rest.

/// A table: a header row and data rows, rendered with [`Table::render`].
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Add a row; missing cells render empty, extra cells are kept.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in `\n`.
    pub fn render(&self) -> String {
        self.render_continued(&mut Vec::new(), false)
    }

    /// Render one part of a table printed in parts (a page at a time): columns are at least
    /// as wide as `widths`, which grows to fit this part; `continued` leaves out the header,
    /// printed with the first part.
    pub fn render_continued(&self, widths: &mut Vec<usize>, continued: bool) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        widths.resize(widths.len().max(columns), 0);
        let columns = widths.len();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in self.rows.iter().skip(usize::from(continued)) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                if i + 1 < columns {
                    // `{:<w$}` pads by characters, as the widths are counted.
                    line.push_str(&format!("{cell:<width$}"));
                } else {
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let mut t = Table::new(&["HOST", "USER", "IDLE"]);
        t.row(vec!["a.example".into(), "alice".into(), "300s".into()]);
        t.row(vec!["bb.example.com".into(), "bob".into(), "5s".into()]);
        assert_eq!(
            t.render(),
            "HOST            USER   IDLE\n\
             a.example       alice  300s\n\
             bb.example.com  bob    5s\n"
        );
    }

    #[test]
    fn the_last_column_and_empty_cells_leave_no_trailing_space() {
        let mut t = Table::new(&["ID", "NOTE"]);
        t.row(vec!["n1".into(), "".into()]);
        t.row(vec!["n2".into(), "a long note that is not padded".into()]);
        t.row(vec!["n3".into()]);
        assert_eq!(
            t.render(),
            "ID  NOTE\nn1\nn2  a long note that is not padded\nn3\n"
        );
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["é…".into(), "x".into()]);
        assert_eq!(t.render(), "A   B\né…  x\n");
    }

    #[test]
    fn a_header_only_table_renders_one_line() {
        assert_eq!(Table::new(&["X", "Y"]).render(), "X  Y\n");
    }
}
