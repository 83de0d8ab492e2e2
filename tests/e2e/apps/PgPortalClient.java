// A JDBC client whose cursor is a named portal fetched over several round trips: with
// autocommit off and a fetch size, pgjdbc binds the query to a portal and sends one more
// Execute(portal, fetchSize) each time the previous batch is used up. Between batches it runs
// another query on the same connection, on the unnamed statement.
// Usage: java -cp postgresql.jar:DIR PgPortalClient GO_FILE DONE_FILE PORT
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;

public final class PgPortalClient {
    public static void main(String[] args) throws Exception {
        Path go = Path.of(args[0]);
        Files.writeString(Path.of(args[0] + ".waiting"), "");
        while (!Files.exists(go)) {
            Thread.sleep(20);
        }
        String url = "jdbc:postgresql://127.0.0.1:" + args[2] + "/postgres?sslmode=disable";
        int rows = 0;
        try (Connection conn = DriverManager.getConnection(url, "postgres", "")) {
            conn.setAutoCommit(false);
            try (PreparedStatement cursor = conn.prepareStatement(
                     "SELECT g AS portal_marker FROM generate_series(1, ?) g");
                 PreparedStatement other = conn.prepareStatement("SELECT ? AS other_marker")) {
                cursor.setFetchSize(5);
                cursor.setInt(1, 23);
                try (ResultSet rs = cursor.executeQuery()) {
                    while (rs.next()) {
                        rows++;
                        if (rows % 5 == 1) {
                            other.setInt(1, rows);
                            try (ResultSet o = other.executeQuery()) {
                                o.next();
                            }
                        }
                    }
                }
            }
            conn.commit();
        }
        Files.writeString(Path.of(args[1]), Integer.toString(rows));
    }
}
