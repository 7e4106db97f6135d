//! The Parquet side of `export`: the schema from [`COLUMNS`] and [`KINDS`],
//! and a writer that buffers rows column by column and writes a row group
//! every [`ROW_GROUP_ROWS`] rows. Uncompressed: the file is for analysts'
//! tools, and the format alone keeps the dependency small.

use std::io::Write;
use std::sync::Arc;

use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int32Type, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use super::{COLUMNS, Cell, ExportError, KINDS, Kind};

/// Rows per row group.
const ROW_GROUP_ROWS: usize = 8192;

/// The file's schema, as Parquet's message-type text.
pub fn schema_text() -> String {
    let mut text = String::from("message outcome {\n");
    for (name, kind) in COLUMNS.iter().zip(KINDS) {
        let (optional, physical, annotation) = match kind {
            Kind::Text { optional } => (optional, "BYTE_ARRAY", " (STRING)"),
            Kind::U64 { optional } => (optional, "INT64", " (INTEGER(64, false))"),
            Kind::U16 => (true, "INT32", " (INTEGER(16, false))"),
            Kind::Bool => (false, "BOOLEAN", ""),
            Kind::Micros { optional } => (optional, "INT64", " (TIMESTAMP(MICROS, true))"),
            Kind::Millis => (true, "INT64", " (TIMESTAMP(MILLIS, true))"),
        };
        let repetition = if optional { "OPTIONAL" } else { "REQUIRED" };
        text.push_str(&format!("  {repetition} {physical} {name}{annotation};\n"));
    }
    text.push('}');
    text
}

fn schema() -> Result<Arc<Type>, ParquetError> {
    parquet::schema::parser::parse_message_type(&schema_text()).map(Arc::new)
}

/// One column's values of the rows buffered so far.
enum Values {
    Text(Vec<ByteArray>),
    Int64(Vec<i64>),
    Int32(Vec<i32>),
    Bool(Vec<bool>),
}

struct Column {
    values: Values,
    /// Definition levels (1 present, 0 absent), for optional columns.
    defs: Vec<i16>,
    optional: bool,
}

impl Column {
    fn new(kind: Kind) -> Column {
        let (values, optional) = match kind {
            Kind::Text { optional } => (Values::Text(Vec::new()), optional),
            Kind::U64 { optional } | Kind::Micros { optional } => {
                (Values::Int64(Vec::new()), optional)
            }
            Kind::Millis => (Values::Int64(Vec::new()), true),
            Kind::U16 => (Values::Int32(Vec::new()), true),
            Kind::Bool => (Values::Bool(Vec::new()), false),
        };
        Column {
            values,
            defs: Vec::new(),
            optional,
        }
    }

    fn push(&mut self, cell: &Cell) {
        let present = match (&mut self.values, cell) {
            (Values::Text(values), Cell::Text(text)) => text
                .as_ref()
                .map(|text| values.push(ByteArray::from(text.as_str())))
                .is_some(),
            // Unsigned values keep their bits in Parquet's signed INT64; the
            // INTEGER(64, false) annotation tells readers so.
            (Values::Int64(values), Cell::U64(value)) => {
                value.map(|value| values.push(value as i64)).is_some()
            }
            (Values::Int64(values), Cell::Micros(at)) => at
                .and_then(|at| i64::try_from(at.as_micros()).ok())
                .map(|micros| values.push(micros))
                .is_some(),
            (Values::Int64(values), Cell::Millis(millis)) => millis
                .and_then(|millis| i64::try_from(millis).ok())
                .map(|millis| values.push(millis))
                .is_some(),
            (Values::Int32(values), Cell::U16(code)) => {
                code.map(|code| values.push(i32::from(code))).is_some()
            }
            (Values::Bool(values), Cell::Bool(value)) => {
                values.push(*value);
                true
            }
            (_, cell) => unreachable!("a {cell:?} in a column of another kind"),
        };
        assert!(
            present || self.optional,
            "an absent value in a required column"
        );
        self.defs.push(i16::from(present));
    }

    fn clear(&mut self) {
        self.defs.clear();
        match &mut self.values {
            Values::Text(values) => values.clear(),
            Values::Int64(values) => values.clear(),
            Values::Int32(values) => values.clear(),
            Values::Bool(values) => values.clear(),
        }
    }
}

/// Buffers rows and writes them as row groups.
pub struct Writer<W: Write + Send> {
    file: SerializedFileWriter<W>,
    columns: Vec<Column>,
    rows: usize,
}

impl<W: Write + Send> Writer<W> {
    pub fn new(out: W) -> Result<Writer<W>, ExportError> {
        let properties = Arc::new(
            WriterProperties::builder()
                .set_created_by(format!("tapledger-node {}", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        Ok(Writer {
            file: SerializedFileWriter::new(out, schema()?, properties)?,
            columns: KINDS.into_iter().map(Column::new).collect(),
            rows: 0,
        })
    }

    pub fn push(&mut self, cells: &[Cell; COLUMNS.len()]) -> Result<(), ExportError> {
        for (column, cell) in self.columns.iter_mut().zip(cells) {
            column.push(cell);
        }
        self.rows += 1;
        if self.rows == ROW_GROUP_ROWS {
            self.write_row_group()?;
        }
        Ok(())
    }

    fn write_row_group(&mut self) -> Result<(), ExportError> {
        let mut group = self.file.next_row_group()?;
        for column in &mut self.columns {
            let mut writer = group
                .next_column()?
                .ok_or_else(|| ParquetError::General("fewer columns than the schema".into()))?;
            let defs = column.optional.then_some(column.defs.as_slice());
            match &column.values {
                Values::Text(values) => writer
                    .typed::<ByteArrayType>()
                    .write_batch(values, defs, None)?,
                Values::Int64(values) => writer
                    .typed::<Int64Type>()
                    .write_batch(values, defs, None)?,
                Values::Int32(values) => writer
                    .typed::<Int32Type>()
                    .write_batch(values, defs, None)?,
                Values::Bool(values) => {
                    writer.typed::<BoolType>().write_batch(values, defs, None)?
                }
            };
            writer.close()?;
            column.clear();
        }
        group.close()?;
        self.rows = 0;
        Ok(())
    }

    /// Writes the rows still buffered and the file's footer.
    pub fn finish(mut self) -> Result<(), ExportError> {
        if self.rows > 0 {
            self.write_row_group()?;
        }
        self.file.close()?;
        Ok(())
    }
}
