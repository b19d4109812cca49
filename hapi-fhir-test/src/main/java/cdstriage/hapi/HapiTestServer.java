package cdstriage.hapi;

import ca.uhn.fhir.rest.server.RestfulServer;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts a HAPI FHIR JPA server (R4, H2, rest-hook Subscriptions) for cds-triage's tests.
 *
 * <pre>
 *   java -Xmx768m -jar target/hapi-fhir-test.jar PORT      # FHIR base http://127.0.0.1:PORT/fhir
 *   java -Dhapi.port=PORT -jar target/hapi-fhir-test.jar   # the same
 * </pre>
 *
 * It listens on 127.0.0.1 only. The settings are in {@link HapiServerConfig}; the database is H2 in
 * memory unless {@code -Dhapi.datasource.url=jdbc:h2:file:...} names a file. {@link StrictValidation} adds the
 * strict mode ({@code -Dhapi.validate_requests=true}, {@code -Dhapi.validation.packages=a.tgz,b.tgz}). It logs
 * "HAPI FHIR ... listening on ..." when ready and stops cleanly on SIGTERM / Ctrl-C.
 */
public final class HapiTestServer {

	private static final Logger ourLog = LoggerFactory.getLogger(HapiTestServer.class);
	static final String LOOPBACK = "127.0.0.1";

	private HapiTestServer() {}

	public static void main(String[] args) throws Exception {
		int port = port(args);
		long started = System.nanoTime();

		AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(HapiServerConfig.class);
		RestfulServer restfulServer = spring.getBean(RestfulServer.class);
		StrictValidation.configure(spring, restfulServer); // -Dhapi.validation.packages, -Dhapi.validate_requests

		Server jetty = new Server();
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost(LOOPBACK);
		connector.setPort(port);
		jetty.addConnector(connector);
		ServletContextHandler context = new ServletContextHandler();
		context.setContextPath("/");
		ServletHolder holder = new ServletHolder("fhir", restfulServer);
		holder.setInitOrder(1);
		context.addServlet(holder, "/fhir/*");
		jetty.setHandler(context);

		Runtime.getRuntime().addShutdownHook(new Thread(() -> {
			try {
				jetty.stop();
			} catch (Exception e) {
				ourLog.warn("stopping Jetty: {}", e.toString());
			}
			spring.close();
		}, "hapi-shutdown"));

		try {
			jetty.start();
		} catch (Exception e) {
			ourLog.error("cannot listen on {}:{}: {}", LOOPBACK, port, e.toString());
			spring.close();
			System.exit(1);
		}
		ourLog.info("HAPI FHIR {} listening on http://{}:{}/fhir (started in {} s)",
				ca.uhn.fhir.util.VersionUtil.getVersion(), LOOPBACK, connector.getLocalPort(),
				String.format("%.1f", (System.nanoTime() - started) / 1e9));
		jetty.join();
	}

	private static int port(String[] args) {
		String value = args.length > 0 ? args[0] : System.getProperty("hapi.port", "8080");
		try {
			int port = Integer.parseInt(value.trim());
			if (port < 0 || port > 65535) {
				throw new NumberFormatException();
			}
			return port;
		} catch (NumberFormatException e) {
			System.err.println("usage: java -jar hapi-fhir-test.jar PORT   (or -Dhapi.port=PORT); got " + value);
			System.exit(2);
			return -1;
		}
	}
}
